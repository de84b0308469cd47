"""Multi-host start-up: one call, :func:`init_distributed`, before any other JAX work.

How the processes find each other (``DistributedConfig.mode``):

* ``"auto"`` (default), first match wins:

  1. ``coordinator_address`` set in the config → **explicit** (below);
  2. inside a SLURM job step with more than one task (``SLURM_JOB_ID``,
     ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS`` > 1, ``SLURM_PROCID``, ``SLURM_LOCALID``) →
     **slurm**: JAX derives coordinator (first node of the step; port
     ``61440 + job_id % 4096`` unless ``JAX_COORDINATOR_PORT`` is set), process count and id
     from those variables. JAX then assumes one task per GPU (``local_device_ids =
     [SLURM_LOCALID]``); with one task per node set ``distributed.local_device_ids`` to all
     of the node's GPUs;
  3. on a Cloud TPU VM (``libtpu`` installed and a TPU worker environment:
     ``TPU_WORKER_HOSTNAMES`` / ``TPU_WORKER_ID`` / ``MEGASCALE_COORDINATOR_ADDRESS`` /
     ``TPU_PROCESS_ADDRESSES``, or ``TPU_ACCELERATOR_TYPE``) → **tpu**: JAX auto-detects
     everything (from the TPU environment and the VM's metadata server). A variable that
     holds libtpu's own placeholder ("WARNING: could not determine ...", which libtpu writes
     into the process environment when it starts on a machine that is not a TPU VM, and
     which every child process inherits) does not count;
  4. otherwise → **single**: nothing to do (one process, no coordinator).

* ``"explicit"``: ``coordinator_address`` ("host:port" of process 0), ``num_processes`` and
  ``process_id`` from the config (e.g. ``distributed.process_id=$RANK`` on the command line);
  JAX's cluster auto-detection is switched off so stray scheduler variables cannot override
  them.
* ``"slurm"`` / ``"tpu"``: force that detection; ``"off"``: never initialise.

:func:`plan_distributed` makes that decision from a config and an environment without side
effects (it is what the tests check for every case); :func:`init_distributed` executes it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Mapping
from tml.train.config import DistributedConfig  # noqa: F401  (re-exported)

MODES = ("auto", "explicit", "slurm", "tpu", "off")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_WORKER_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS",
                    "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE")


@dataclass(frozen=True)
class DistributedPlan:
    """What :func:`init_distributed` will do: ``source`` is ``single`` (no-op), ``explicit``,
    ``slurm`` or ``tpu``; ``kwargs`` go to ``jax.distributed.initialize``."""

    source: str
    kwargs: dict = field(default_factory=dict)
    reason: str = ""


@dataclass(frozen=True)
class DistributedInfo:
    """The result: this process's place in the run."""

    source: str
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int


def _has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _tpu_worker_vars(env: Mapping[str, str]) -> list[str]:
    """The TPU worker variables ``env`` really sets: not empty, and not libtpu's
    placeholder (on a host that is not a TPU VM, a process that started JAX with libtpu
    installed has ``TPU_WORKER_ID`` etc. set to "WARNING: could not determine ...")."""
    return [v for v in _TPU_WORKER_VARS
            if env.get(v, "").strip() and not env[v].lstrip().upper().startswith("WARNING")]


def _slurm_tasks(env: Mapping[str, str]) -> int | None:
    if not all(v in env for v in _SLURM_VARS):
        return None
    try:
        return int(env["SLURM_NTASKS"])
    except ValueError:
        return None


def plan_distributed(cfg: DistributedConfig, environ: Mapping[str, str] | None = None,
                     has_libtpu: bool | None = None) -> DistributedPlan:
    """Decide how to start (see the module docstring). Pure: reads ``environ`` (default
    ``os.environ``) and ``has_libtpu`` (default: whether ``libtpu`` is importable)."""
    env = os.environ if environ is None else environ
    if cfg.mode not in MODES:
        raise ValueError(f"distributed.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode == "off":
        return DistributedPlan("single", reason="distributed.mode=off")

    mode = cfg.mode
    if mode == "auto":
        tpu = bool(_tpu_worker_vars(env)) and (_has_libtpu() if has_libtpu is None else has_libtpu)
        if cfg.coordinator_address:
            mode = "explicit"
        elif (_slurm_tasks(env) or 0) > 1:
            mode = "slurm"
        elif tpu:
            mode = "tpu"
        else:
            return DistributedPlan("single", reason="no coordinator_address, no multi-task "
                                   "SLURM step, no TPU worker environment")

    common: dict[str, Any] = {"initialization_timeout": cfg.initialization_timeout}
    if cfg.local_device_ids is not None:
        common["local_device_ids"] = list(cfg.local_device_ids)
    if mode == "explicit":
        missing = [k for k in ("coordinator_address", "num_processes", "process_id")
                   if getattr(cfg, k) is None]
        if missing:
            raise ValueError(
                "explicit multi-process start needs distributed.coordinator_address, "
                "distributed.num_processes and distributed.process_id; missing: "
                + ", ".join(f"distributed.{k}" for k in missing))
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(f"distributed.process_id={cfg.process_id} is not in "
                             f"[0, distributed.num_processes={cfg.num_processes})")
        if cfg.num_processes == 1:
            return DistributedPlan("single", reason="num_processes=1")
        return DistributedPlan("explicit", {
            "coordinator_address": cfg.coordinator_address, "num_processes": cfg.num_processes,
            "process_id": cfg.process_id, "cluster_detection_method": "deactivate", **common,
        }, reason="coordinator_address given")
    if mode == "slurm":
        n = _slurm_tasks(env)
        if n is None:
            raise ValueError("distributed.mode=slurm but this is not a SLURM job step: need "
                             + ", ".join(_SLURM_VARS) + " (launch the job with srun)")
        if n == 1:
            return DistributedPlan("single", reason="SLURM step with one task")
        return DistributedPlan("slurm", {"cluster_detection_method": "slurm", **common},
                               reason=f"SLURM step with {n} tasks")
    # tpu: let JAX detect GKE or GCE TPU clusters itself
    return DistributedPlan("tpu", dict(common), reason="Cloud TPU VM worker environment ("
                           + (", ".join(_tpu_worker_vars(env)) or "forced by distributed.mode=tpu") + ")")


def init_distributed(cfg: DistributedConfig | None = None) -> DistributedInfo:
    """Start the JAX distributed runtime as planned by :func:`plan_distributed` (a no-op for
    a single process, and when it is already initialised). Call before any JAX computation."""
    import jax

    cfg = cfg or DistributedConfig()
    plan = plan_distributed(cfg)
    if plan.source != "single" and not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(**plan.kwargs)
        except RuntimeError as e:
            if "before any JAX" in str(e) or "must be called before" in str(e):
                raise RuntimeError(
                    "init_distributed() must run before anything touches JAX devices or "
                    "computes with JAX (call it first thing in the entry point)") from e
            raise
    return DistributedInfo(
        source=plan.source if plan.source != "single" or not jax.distributed.is_initialized()
        else "preinitialized",
        process_index=jax.process_index(), process_count=jax.process_count(),
        local_device_count=jax.local_device_count(), device_count=jax.device_count(),
    )


__all__ = ["DistributedConfig", "DistributedPlan", "DistributedInfo", "plan_distributed",
           "init_distributed"]
