"""Logical-axis sharding: the model names its axes, rules map the names to mesh axes.

Every parameter of :mod:`tml.model` carries ``logical_axes`` metadata, e.g.
``("embed", "q_heads")`` or ``("experts", "embed", "expert_mlp")``. A **rule set** maps
each logical name to zero, one or several mesh axes (``"data"``, ``"fsdp"``,
``"tensor"``, ``"expert"``, :mod:`tml.parallel.mesh`)::

    rules = {"embed": "fsdp", "q_heads": "tensor", "batch": ["data", "fsdp", "expert"],
             "norm": None, ...}        # or a list of (name, axes) pairs

Parallelism is applied from outside the model, which never names a mesh axis::

    from tml.parallel import MeshConfig, make_mesh, shard_model, shard_batch
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = shard_model(InteractionModel(cfg, rngs=nnx.Rngs(0)), DEFAULT_RULES, mesh)
    logits = nnx.jit(lambda m, b: m(b))(model, shard_batch(batch, mesh))

(``create_sharded`` builds the model directly in its sharded layout, never holding the
full parameters on one device.) The compiler (GSPMD) propagates the parameter and batch
shardings through the program; :func:`logical_constraint` lets code pin an activation's
layout by logical names too, a no-op outside :func:`use_rules`.

How a logical spec becomes a :class:`~jax.sharding.PartitionSpec`
(:func:`logical_to_spec`), dimension by dimension, left to right:

* a name mapped to nothing (``None`` / ``[]``) is replicated;
* a mesh axis of size 1 is dropped (so one rule set serves every mesh shape);
* a mesh axis already used by an earlier dimension of the same array is dropped (a
  mesh axis may appear only once in a spec);
* a mesh axis whose size does not divide what is left of the dimension is dropped
  (e.g. the byte vocabulary of 269 entries stays replicated on ``tensor=2``), the
  following axes of the same rule are still tried.

Bits (measured in ``tests/parallel``, tiny model, 8 fake CPU devices): with the
``batch_invariant`` kernels a pure data-parallel mesh (``data=8``) gives the
single-device logits bit for bit — each row is computed whole on one device by the same
row-tiled kernels — and the ``standard`` kernels do not. Meshes that shard a contracted
dimension (``tensor``, and ``fsdp`` unless the compiler chooses to all-gather the
weights first) get a compiler-inserted ``psum`` whose order differs from the
single-device sum: close (~1e-6 relative) but not bitwise. Bitwise tensor parallelism
needs the explicit row-parallel collectives of ``tml.kernels`` (``row_parallel_linear``
under ``shard_map``), not GSPMD.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tml.parallel.config import DEFAULT_RULES, default_rules  # noqa: F401  (re-exported)
from tml.parallel.mesh import AXES

Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def normalize_rules(rules: Rules | None = None, mesh=None) -> dict[str, tuple[str, ...]]:
    """Rules as ``{logical name: (mesh axes...)}``.

    Accepts a mapping (an OmegaConf ``DictConfig`` too) or a sequence of
    ``(name, axes)`` pairs (a later pair overrides an earlier one); ``axes`` is ``None``,
    a mesh-axis name or a list of them. ``None`` = :data:`DEFAULT_RULES`. Mesh axes are
    checked against ``mesh.axis_names`` if a mesh is given (else against ``AXES``).
    """
    if rules is None:
        rules = DEFAULT_RULES
    items: Iterable = rules.items() if hasattr(rules, "items") else rules
    known = tuple(mesh.axis_names) if mesh is not None else AXES
    out: dict[str, tuple[str, ...]] = {}
    for pair in items:
        try:
            name, axes = pair
        except (TypeError, ValueError):
            raise ValueError(f"sharding rule {pair!r} is not a (logical name, mesh axes) pair") from None
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        else:
            try:
                axes = tuple(axes)
            except TypeError:
                raise ValueError(f"sharding rule {name!r}: {axes!r} is not a mesh axis, a list of "
                                 f"them, or null") from None
        for a in axes:
            if not isinstance(a, str) or a not in known:
                raise ValueError(f"sharding rule {name!r} -> {list(axes)}: {a!r} is not a mesh axis "
                                 f"(mesh axes: {list(known)})")
        if len(set(axes)) != len(axes):
            raise ValueError(f"sharding rule {name!r} repeats a mesh axis: {list(axes)}")
        out[str(name)] = axes
    return out


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def logical_to_spec(axes: Sequence[str | None], rules: Rules | None, mesh,
                    shape: Sequence[int] | None = None, *, strict: bool = True) -> PartitionSpec:
    """The :class:`PartitionSpec` of an array whose dimensions are named ``axes``.

    rules: as :func:`normalize_rules` (``None`` = defaults). mesh: a ``Mesh`` or an
    ``AbstractMesh`` (only axis names and sizes are read). shape: the array's shape,
    for the divisibility check (without it only size-1 axes are dropped). A ``None``
    entry in ``axes`` is replicated. strict: a logical name with no rule raises
    ``KeyError`` (else it is replicated).
    """
    table = rules if _is_normalized(rules) else normalize_rules(rules, mesh)
    sizes = _mesh_sizes(mesh)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            if strict:
                raise KeyError(f"no sharding rule for logical axis {name!r} (of {tuple(axes)}); add "
                               f"one to the rules, e.g. {name}: null to replicate it")
            spec.append(None)
            continue
        chosen: list[str] = []
        factor = 1
        for a in table[name]:
            if a not in sizes:
                raise ValueError(f"rule {name!r} names mesh axis {a!r}, not in the mesh {sizes}")
            n = sizes[a]
            if n == 1 or a in used:
                continue
            if shape is not None and shape[i] % (factor * n):
                continue
            chosen.append(a)
            factor *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


class _Normalized(dict):
    """A rules dict already checked by :func:`normalize_rules` (skips re-checking)."""


def _is_normalized(rules) -> bool:
    return isinstance(rules, _Normalized)


def _prepare(rules, mesh) -> _Normalized:
    return rules if _is_normalized(rules) else _Normalized(normalize_rules(rules, mesh))


def variable_spec(var: Any, rules: Rules | None, mesh, *, strict: bool = True) -> PartitionSpec:
    """Spec of one state leaf: a Variable from its ``logical_axes`` metadata (replicated
    when it has none, e.g. the MoE router's correction bias), anything else replicated."""
    if not _is_variable(var):
        return PartitionSpec()
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        return PartitionSpec()
    shape = getattr(var, "shape", None)
    return logical_to_spec(tuple(axes), _prepare(rules, mesh), mesh, shape, strict=strict)


def state_specs(state: Any, rules: Rules | None, mesh, *, strict: bool = True) -> Any:
    """The tree of ``state`` (an ``nnx.State``, concrete or from ``nnx.eval_shape``)
    with every Variable's value replaced by its :class:`PartitionSpec`."""
    table = _prepare(rules, mesh)

    def one(x):
        spec = variable_spec(x, table, mesh, strict=strict)
        return x.replace(spec) if _is_variable(x) else spec

    return jax.tree.map(one, state, is_leaf=_is_variable)


def state_shardings(state: Any, rules: Rules | None, mesh, *, strict: bool = True) -> Any:
    """A tree matching ``state`` (Variables kept, their values replaced) of
    :class:`NamedSharding` — usable as ``jax.device_put`` target or ``jax.jit``
    ``in_shardings``/``out_shardings`` for that state."""
    table = _prepare(rules, mesh)

    def one(x):
        s = NamedSharding(mesh, variable_spec(x, table, mesh, strict=strict))
        return x.replace(s) if _is_variable(x) else s

    return jax.tree.map(one, state, is_leaf=_is_variable)


def param_specs(state: Any, rules: Rules | None, mesh, *, strict: bool = True) -> dict[str, PartitionSpec]:
    """``{"blocks/0/attn/wq/w": PartitionSpec(...), ...}`` for every leaf of ``state``
    (for reports and tests)."""
    table = _prepare(rules, mesh)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable):
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[key] = variable_spec(leaf, table, mesh, strict=strict)
    return out


def shard_model(model: nnx.Module, rules: Rules | None, mesh, *, strict: bool = True) -> nnx.Module:
    """Place an NNX model's state on ``mesh`` by its logical axes (in place; returns
    the model). Every array is moved, so afterwards a jitted call on the model runs
    SPMD over the mesh."""
    state = nnx.state(model)
    placed = jax.device_put(state, state_shardings(state, rules, mesh, strict=strict))
    nnx.update(model, placed)
    return model


def create_sharded(ctor: Callable[[], nnx.Module], rules: Rules | None, mesh, *,
                   strict: bool = True) -> nnx.Module:
    """Build ``ctor()`` directly in its sharded layout: shapes from ``nnx.eval_shape``,
    shardings from the rules, then the initialiser jitted with those output shardings,
    so no device ever holds more than its shard (what a model too big for one device
    needs). ``ctor`` must create its own ``nnx.Rngs``."""
    graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
    shardings = state_shardings(abstract, rules, mesh, strict=strict)
    state = jax.jit(lambda: nnx.split(ctor())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ batches
def batch_spec(mesh, rules: Rules | None = None, batch_size: int | None = None) -> PartitionSpec:
    """Spec of a packed batch array: its leading [B] axis over the ``"batch"`` rule's
    mesh axes (default data, fsdp, expert), the rest replicated. With ``batch_size``,
    axes that do not divide it are dropped."""
    table = _prepare(rules, mesh)
    if "batch" not in table:
        raise KeyError("the sharding rules have no 'batch' entry")
    return logical_to_spec(("batch",), table, mesh, None if batch_size is None else (batch_size,))


def batch_sharding(mesh, rules: Rules | None = None, batch_size: int | None = None) -> NamedSharding:
    """The :class:`NamedSharding` of every array of a packed batch (``tokens [B, L]``,
    ``dmel [B, L, 80]``, ``patches [B, P, 2, 40, 40, 3]`` ...): leading axis split over
    ``data`` x ``fsdp`` (x ``expert``), see :func:`batch_spec`."""
    return NamedSharding(mesh, batch_spec(mesh, rules, batch_size))


def shard_batch(batch: Mapping[str, Any], mesh, rules: Rules | None = None) -> dict[str, jax.Array]:
    """Put a packed batch (dict of [B, ...] arrays) on the mesh.

    Single process: ``batch`` is the global batch, ``jax.device_put``. Several processes
    (multi-controller): ``batch`` is this process's rows, assembled into the global
    array with ``jax.make_array_from_process_local_data``.
    """
    arrays = {k: v for k, v in batch.items()}
    sizes = {int(v.shape[0]) for v in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the leading (batch) size: {sorted(sizes)}")
    local = sizes.pop()
    global_size = local * jax.process_count()
    sharding = batch_sharding(mesh, rules, global_size)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in arrays.items()}
    import numpy as np

    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in arrays.items()}


# --------------------------------------------------------------------------- activations
_ACTIVE: contextvars.ContextVar[tuple[_Normalized, Any] | None] = contextvars.ContextVar(
    "tml_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Rules | None, mesh) -> Iterator[None]:
    """Activate rules for :func:`logical_constraint` (read at trace time: trace the
    jitted function inside the block)."""
    token = _ACTIVE.set((_prepare(rules, mesh), mesh))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def logical_constraint(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names, for model code that wants to pin
    an activation layout without naming mesh axes; identity outside :func:`use_rules`.
    Unknown names are replicated (activations are hints, not a contract)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    table, mesh = active
    spec = logical_to_spec(tuple(axes), table, mesh, x.shape, strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def bytes_per_device(state: Any, rules: Rules | None, mesh, *, strict: bool = True) -> tuple[int, float]:
    """(total bytes of ``state``, bytes the most-loaded device holds) under the rules —
    for sizing a mesh before allocating anything (``state`` from ``nnx.eval_shape``,
    ``mesh`` may be a ``jax.sharding.AbstractMesh``)."""
    import math

    import numpy as np

    table = _prepare(rules, mesh)
    sizes = _mesh_sizes(mesh)
    total, per = 0, 0.0
    for leaf in jax.tree.leaves(state, is_leaf=_is_variable):
        value = leaf.get_value() if _is_variable(leaf) else leaf
        n = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        div = 1
        for entry in variable_spec(leaf, table, mesh, strict=strict):
            for a in (entry,) if isinstance(entry, str) else (entry or ()):
                div *= sizes[a]
        total += n
        per += n / div
    return total, per
