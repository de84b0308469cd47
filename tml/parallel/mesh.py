"""The device mesh: four named axes ``("data", "fsdp", "tensor", "expert")``.

``MeshConfig`` is a plain dataclass (a Hydra structured config): one size per axis, with
``-1`` meaning "whatever is left of the devices" (at most one axis may say so). The
product of the sizes must equal the number of devices; :func:`make_mesh` says which
sizes it resolved and why they do not fit when they don't.

    from tml.parallel import MeshConfig, make_mesh
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))   # 8 devices -> 2 x 2 x 2 x 1

Axis roles (what the default sharding rules put on them, :mod:`tml.parallel.sharding`):

* ``data``   — pure data parallelism: the batch is split, parameters are replicated;
* ``fsdp``   — the batch is split *and* parameters are sharded (all-gathered for use);
* ``tensor`` — heads / MLP width / vocabulary split inside a layer (Megatron style);
* ``expert`` — MoE experts split across devices.

Importing this module does not start JAX (so configs can be built before the
``XLA_FLAGS`` of a process are final); :func:`make_mesh` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")


@dataclass
class MeshConfig:
    """Mesh axis sizes; ``-1`` = the rest of the devices (at most one axis).

    The default puts every device on ``data`` (pure data parallelism): with the
    ``batch_invariant`` kernels that keeps each row's results bitwise independent of
    the number of devices.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def sizes(self) -> dict[str, int]:
        return {a: int(getattr(self, a)) for a in AXES}

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Concrete axis sizes for ``n_devices`` devices (``-1`` filled in).

        Raises ``ValueError`` naming the sizes and the device count when they do not fit.
        """
        sizes = self.sizes()
        bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
        if bad:
            raise ValueError(f"mesh axis sizes must be >= 1 or -1 (the rest); got {bad}")
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise ValueError(f"at most one mesh axis may be -1 (the rest of the devices); got {free} "
                             f"in {_fmt(sizes)}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if n_devices % fixed:
                raise ValueError(
                    f"mesh {_fmt(sizes)}: the fixed axes multiply to {fixed}, which does not divide "
                    f"the {n_devices} devices, so '{free[0]}=-1' has no integer size")
            sizes[free[0]] = n_devices // fixed
        elif fixed != n_devices:
            raise ValueError(
                f"mesh {_fmt(sizes)} has {fixed} devices but {n_devices} are available; the sizes must "
                f"multiply to the device count (use -1 on one axis for 'the rest')")
        return sizes


def _fmt(sizes: dict[str, int]) -> str:
    return "(" + ", ".join(f"{a}={s}" for a, s in sizes.items()) + ")"


def make_mesh(cfg: MeshConfig | dict | None = None, devices: Sequence[Any] | None = None):
    """A :class:`jax.sharding.Mesh` with axes ``("data", "fsdp", "tensor", "expert")``.

    cfg: a :class:`MeshConfig` (or a dict / OmegaConf node of its fields; ``None`` = the
    default, all devices on ``data``). devices: the devices to use (default
    ``jax.devices()``, every device of every process). The device order comes from
    ``jax.make_mesh`` (topology-aware on TPU) when all devices are used, else the given
    order. All axes are ``AxisType.Auto`` (sharding propagated by the compiler from the
    parameter and batch shardings).
    """
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    if cfg is None:
        cfg = MeshConfig()
    elif not isinstance(cfg, MeshConfig):
        cfg = MeshConfig(**{k: int(v) for k, v in dict(cfg).items()})
    all_devices = jax.devices()
    devices = list(all_devices if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    types = (AxisType.Auto,) * len(AXES)
    if len(devices) == len(all_devices) and set(devices) == set(all_devices):
        try:
            return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
        except Exception:  # noqa: BLE001, S110 — unusual topology: fall back to the given order
            pass
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=types)
