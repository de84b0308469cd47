"""Training checkpoints: Orbax ``CheckpointManager`` with keep-last / keep-best policies,
resharding restore, a model-config guard and a SIGTERM (preemption) handler.

One checkpoint is the directory ``<dir>/<step>/`` holding five Orbax items:

=============  ===========================================================================
``model``      the model's state (``nnx.State`` or any pytree of arrays), see *layout*
``opt_state``  the optimizer state (optax state pytree, or ``nnx.State`` of an
               ``nnx.Optimizer``); optional
``rng``        PRNG key(s), any pytree; typed keys (``jax.random.key``) are stored as
               their ``key_data`` and re-wrapped on restore; optional
``data``       the data loader state of *every* process (``LoaderState.to_dict()``),
               JSON; on restore each process gets back its own
``meta``       JSON: step, config fingerprint and the flattened model config, key
               implementations, metrics, format version
=============  ===========================================================================

**Layout.** Array trees are stored as nested dicts keyed by the tree's path names
(attribute names, dict keys, sequence indices; the ``.value`` of NNX Variables dropped), so
the on-disk format does not depend on container types: a checkpoint written from an
``nnx.State`` restores into a plain dict target and vice versa.

**Restore onto any mesh.** :meth:`Checkpointer.restore` takes *targets*: trees shaped like
what was saved whose leaves are ``jax.ShapeDtypeStruct`` (with ``.sharding``) or arrays
(their ``.sharding`` is used, their values ignored); e.g. ``nnx.state(nnx.eval_shape(...))``
with shardings attached by :func:`with_shardings`. Orbax reads each shard straight into the
target sharding, so a checkpoint written on one mesh restores onto another. A leaf without
a sharding is restored replicated on all devices; a ``numpy`` leaf as a host array.

**Atomic saves.** Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` only after every file is written (tested), and old steps are garbage-collected
only after the new one is committed; a failed save (full disk, I/O error, crash) therefore
never touches the last good checkpoint. The failure is raised as :class:`CheckpointSaveError`
naming the step that failed and the last good one; a half-written tmp directory is removed
by the next :class:`Checkpointer` opened on the directory (in the background, finished before
its first save).

**Async.** ``save`` returns once the arrays are copied off the device buffers (so the caller
may donate or overwrite them); files are written in a background thread. A background
failure is raised by the next ``save``, ``wait_until_finished`` or ``close``.

**Retention.** After each committed save, keep the ``keep_last`` most recent steps plus the
``keep_best`` steps with the best ``best_metric`` among steps saved with that metric
(``best_mode`` ``"min"`` or ``"max"``; NaN counts as worst).

**Config guard.** ``meta`` stores a fingerprint (sha256 of the canonical JSON) of the model
config. Restoring, or saving into a directory whose checkpoints come from another model
config, raises :class:`CheckpointConfigMismatchError` listing the differing keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from tml.train.tree_paths import path_names
from tml.train.config import CheckpointConfig  # noqa: F401  (re-exported)

FORMAT_VERSION = 1
ARRAY_ITEMS = ("model", "opt_state", "rng")


# --------------------------------------------------------------------------- errors


class CheckpointError(RuntimeError):
    """Base class of checkpoint errors."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """The directory holds no (finished) checkpoint, or not the requested step."""


class CheckpointSaveError(CheckpointError):
    """A save failed; the previous checkpoints are intact."""


class CheckpointConfigMismatchError(CheckpointError):
    """The checkpoint was written by a different model config."""


class CheckpointStructureError(CheckpointError):
    """The restore target does not have the checkpoint's arrays (names or shapes differ)."""


# --------------------------------------------------------------------------- config


# --------------------------------------------------------------------------- model-config fingerprint


def config_to_dict(cfg: Any) -> dict:
    """A dataclass / OmegaConf / mapping config → plain JSON-able dict (``None`` → ``{}``)."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model_config must be a dataclass, a mapping or an OmegaConf config, "
                        f"got {type(cfg).__name__}")
    return json.loads(json.dumps(cfg, sort_keys=True, default=repr))


def flatten_config(cfg: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists are leaves)."""

    def walk(d: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> dict[str, Any]:
        for k, v in d.items():
            if isinstance(v, Mapping) and v:
                walk(v, f"{prefix}{k}.", out)
            else:
                out[f"{prefix}{k}"] = v
        return out

    return walk(config_to_dict(cfg), "", {})


def config_fingerprint(cfg: Any) -> str:
    """16 hex digits of the sha256 of the config's canonical JSON."""
    canon = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differing keys of two flattened configs: ``[(key, saved_value, current_value)]``,
    with ``"<absent>"`` for a key only one side has."""
    absent = "<absent>"
    keys = sorted(set(saved) | set(current))
    return [(k, saved.get(k, absent), current.get(k, absent)) for k in keys
            if saved.get(k, absent) != current.get(k, absent)]


# --------------------------------------------------------------------------- tree <-> storable dict


def _is_key_dtype(dtype) -> bool:
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for names, leaf in flat.items():
        d = out
        for n in names[:-1]:
            d = d.setdefault(n, {})
            if not isinstance(d, dict):
                raise CheckpointStructureError(f"path {'/'.join(names)} collides with a leaf")
        if names[-1] in d:
            raise CheckpointStructureError(f"two leaves map to the same path {'/'.join(names)}")
        d[names[-1]] = leaf
    return out


def _flat_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    out = []
    for path, leaf in leaves:
        names = path_names(path)
        if not names:
            names = ("_",)  # a bare array as the whole tree
        out.append((names, leaf))
    return out


def to_storable(tree: Any) -> tuple[dict, dict[str, str]]:
    """Any pytree → (nested dict of arrays, ``{"a/b": key_impl}`` for typed PRNG keys)."""
    flat, key_impls = {}, {}
    for names, leaf in _flat_paths(tree):
        if isinstance(leaf, (int, float, bool, np.number, np.bool_)):
            leaf = np.asarray(leaf)
        if _is_key_dtype(getattr(leaf, "dtype", None)):
            key_impls["/".join(names)] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        flat[names] = leaf
    return _nest(flat), key_impls


def _replicated_sharding() -> jax.sharding.Sharding:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("_all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract_leaf(leaf: Any) -> Any:
    """A target leaf → what Orbax restores into (ShapeDtypeStruct with sharding, or numpy)."""
    if isinstance(leaf, np.ndarray) or isinstance(leaf, (int, float, bool, np.number, np.bool_)):
        return np.asarray(leaf)
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise CheckpointStructureError(f"restore target leaf of type {type(leaf).__name__} is not "
                                       f"an array or jax.ShapeDtypeStruct")
    sharding = getattr(leaf, "sharding", None) or _replicated_sharding()
    if _is_key_dtype(dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attach shardings to an abstract tree: ``shardings`` is one ``Sharding`` for all
    leaves, a tree of them shaped like ``abstract``, or ``fn(path_str, leaf) -> Sharding``."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings),
                            abstract)
    if callable(shardings):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                              sharding=shardings("/".join(path_names(p)), x)),
            abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


# --------------------------------------------------------------------------- per-process JSON


def _gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (one collective if multi-process)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: raw.size] = raw
    allraw = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(allraw[i, : int(lengths[i].reshape(-1)[0])]).decode())
            for i in range(allraw.shape[0])]


def _jsonable_state(state: Any) -> Any:
    if state is None:
        return None
    if hasattr(state, "to_dict"):
        state = state.to_dict()
    elif dataclasses.is_dataclass(state) and not isinstance(state, type):
        state = dataclasses.asdict(state)
    return json.loads(json.dumps(state))


# --------------------------------------------------------------------------- the checkpointer


@dataclass
class Restored:
    """What :meth:`Checkpointer.restore` returns; trees have the targets' structure."""

    step: int
    model: Any
    opt_state: Any | None
    rng: Any | None
    data_state: dict | None          # this process's loader state
    metrics: dict | None
    meta: dict


class Checkpointer:
    """Saves and restores training state in ``directory`` (see the module docstring).

    ``model_config`` is fingerprinted into every checkpoint; ``config_prefix`` is only used
    to phrase override hints in errors (``model.d_model=256``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        model_config: Any = None,
        keep_last: int = 3,
        keep_best: int = 0,
        best_metric: str = "eval_loss",
        best_mode: str = "min",
        async_save: bool = True,
        config_prefix: str = "model",
    ):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the latest checkpoint is what a restart "
                             f"resumes from), got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.model_config = config_to_dict(model_config)
        self.fingerprint = config_fingerprint(model_config)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.keep_last, self.keep_best = keep_last, keep_best
        self.config_prefix = config_prefix
        self._directory_checked = False
        self._pending_step: int | None = None

        worst = math.inf if best_mode == "min" else -math.inf

        def metric_value(metrics: Mapping[str, Any]) -> float:
            v = float(metrics.get(best_metric, worst))
            return worst if math.isnan(v) else v

        policies = [cm.LatestN(n=keep_last)]
        if keep_best > 0:
            # BestN keeps the *last* n after sorting; for "min" sort descending.
            policies.append(cm.BestN(get_metric_fn=metric_value, reverse=(best_mode == "min"),
                                     n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=cm.AnyPreservationPolicy(policies),
            best_fn=metric_value if keep_best > 0 else None,
            best_mode=best_mode,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._ocp = ocp
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers.update(data=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, *, run_dir: str | os.PathLike = ".",
                    model_config: Any = None) -> "Checkpointer":
        directory = Path(cfg.dir)
        if not directory.is_absolute():
            directory = Path(run_dir) / directory
        return cls(directory, model_config=model_config, keep_last=cfg.keep_last,
                   keep_best=cfg.keep_best, best_metric=cfg.best_metric, best_mode=cfg.best_mode,
                   async_save=cfg.async_save)

    # ------------------------------------------------------------------ queries

    def all_steps(self, *, include_pending: bool = False) -> list[int]:
        """Committed steps, ascending (plus a step still being written asynchronously when
        ``include_pending``)."""
        steps = sorted(self._manager.all_steps())
        if (not include_pending and self._pending_step is not None
                and self._manager.is_saving_in_progress()):
            steps = [s for s in steps if s != self._pending_step]
        return steps

    def latest_step(self) -> int | None:
        """The newest committed step (``None`` if there is none)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (the latest if keep-best is off or
        no step has the metric)."""
        if self.keep_best == 0:
            return self.latest_step()
        best = self._manager.best_step()
        return self.latest_step() if best is None else best

    def read_meta(self, step: int) -> dict:
        """The ``meta`` JSON of ``step``."""
        if step not in self.all_steps():
            raise NoCheckpointError(self._no_step_message(step))
        args = self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
        return dict(self._manager.restore(step, args=args).meta)

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        *,
        model: Any,
        opt_state: Any = None,
        rng: Any = None,
        data_state: Any = None,
        metrics: Mapping[str, Any] | None = None,
        wait: bool = False,
    ) -> None:
        """Save a checkpoint of ``step`` (asynchronously unless ``wait``).

        ``data_state``: this process's ``LoaderState`` (or its dict); in a multi-process
        run every process passes its own and all are stored. ``metrics``: scalars stored
        with the step (``best_metric`` among them makes it a keep-best candidate).
        Must be called by every process. Raises :class:`CheckpointSaveError` if this save,
        or the previous asynchronous one, failed.
        """
        ocp = self._ocp
        step = int(step)
        if not self._directory_checked:
            self._check_directory_config()
        self._wait_previous()
        if step in self.all_steps(include_pending=True):
            raise CheckpointSaveError(f"checkpoint step {step} already exists in {self.directory}; "
                                      f"steps are never overwritten")
        metrics = {k: float(np.asarray(v)) for k, v in (metrics or {}).items()}
        data_states = _gather_json(_jsonable_state(data_state))
        items: dict[str, Any] = {}
        key_impls: dict[str, dict[str, str]] = {}
        for name, tree in (("model", model), ("opt_state", opt_state), ("rng", rng)):
            if tree is None:
                continue
            storable, impls = to_storable(tree)
            if storable:  # an empty tree (e.g. optax EmptyState) is not written
                items[name] = ocp.args.StandardSave(storable)
                key_impls[name] = impls
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "config_fingerprint": self.fingerprint,
            "model_config": self.model_config,
            "key_impls": key_impls,
            "items": sorted(items),
            "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()},
            "process_count": jax.process_count(),
            "time": time.time(),
        }
        items["data"] = ocp.args.JsonSave({"per_process": data_states})
        items["meta"] = ocp.args.JsonSave(meta)
        track = self.keep_best > 0 and self.best_metric in metrics
        try:
            self._manager.save(step, args=ocp.args.Composite(**items),
                               metrics=metrics if track else None, force=True)
        except Exception as e:
            self._reload_after_failure()
            raise CheckpointSaveError(self._save_failed_message(step, self.latest_step(), e)) from e
        self._pending_step = step
        if wait:
            self.wait_until_finished()

    def wait_until_finished(self) -> None:
        """Block until the pending asynchronous save is committed (or raise its error)."""
        self._wait_previous()

    def close(self) -> None:
        """Finish the pending save, then release Orbax's threads."""
        try:
            self._wait_previous()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait_previous(self) -> None:
        step, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._reload_after_failure()
            raise CheckpointSaveError(self._save_failed_message(step, self.latest_step(), e)) from e

    def _reload_after_failure(self) -> None:
        """Make the manager usable again after a failed save: drop the failure's copies that
        Orbax keeps for later calls (it would re-raise the same error at the next save or at
        close), and re-read the committed steps from disk (Orbax's in-memory list has already
        dropped the steps the failed save would have garbage-collected, though they are still
        on disk, untouched)."""
        # Orbax's background commit thread may still be finishing (the metadata write can
        # fail first); join it so its copy of the error is collected here, not at the next
        # save. (`_checkpointer` is private Orbax API; without it only the public check runs.)
        inner = getattr(self._manager, "_checkpointer", None)
        for _ in range(4):
            try:
                if inner is not None and hasattr(inner, "wait_until_finished"):
                    inner.wait_until_finished()
                self._manager.check_for_errors()
                break
            except Exception:
                continue
        try:
            self._manager.reload()
        except Exception:  # the directory may be unreadable; the error at hand matters more
            pass

    def _save_failed_message(self, step: int | None, last_good: int | None, e: BaseException) -> str:
        if last_good is not None and last_good != step:
            kept = (f"The last good checkpoint, step {last_good} ({self.directory / str(last_good)}), "
                    f"is untouched and is what restore() returns.")
        else:
            kept = f"No earlier checkpoint exists in {self.directory}."
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, OSError):
            cause = cause.__cause__
        advice = (f"Check free disk space and write permission of {self.directory}, then resume from "
                  f"the last good checkpoint." if isinstance(cause, OSError) else
                  "The state handed to save() could not be written (see the error above); the files "
                  "on disk were not changed.")
        return (f"saving checkpoint step {step} to {self.directory} failed: {type(e).__name__}: {e}. "
                f"{kept} {advice}")

    def _check_directory_config(self) -> None:
        """Refuse to mix checkpoints of two model configs in one directory."""
        latest = self.latest_step()
        if latest is not None:
            meta = self.read_meta(latest)
            if meta.get("config_fingerprint") != self.fingerprint:
                raise CheckpointConfigMismatchError(self._mismatch_message(latest, meta, saving=True))
        self._directory_checked = True

    # ------------------------------------------------------------------ restore

    def restore(
        self,
        step: int | None = None,
        *,
        model: Any,
        opt_state: Any = None,
        rng: Any = None,
        best: bool = False,
        allow_config_mismatch: bool = False,
        merge_data_states: Callable[[list], Any] | None = None,
    ) -> Restored:
        """Restore ``step`` (default: the latest, or the best with ``best=True``).

        ``merge_data_states``: every saving process's loader state (in process order) →
        this process's, for loaders whose position does not depend on the number of
        processes (:class:`tml.train.global_batch.GlobalBatches`); without it a restore
        on another number of processes is refused, as each process's position is its own.

        ``model`` / ``opt_state`` / ``rng`` are targets (see module docstring); an item
        whose target is ``None`` is not read (e.g. ``opt_state=None`` for evaluation).
        Raises :class:`NoCheckpointError`, :class:`CheckpointConfigMismatchError` (unless
        ``allow_config_mismatch``) or :class:`CheckpointStructureError`.
        """
        ocp = self._ocp
        self._wait_previous()
        if step is None:
            step = self.best_step() if best else self.latest_step()
            if step is None:
                raise NoCheckpointError(f"no checkpoint in {self.directory}")
        step = int(step)
        meta = self.read_meta(step)
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} has format version "
                                  f"{meta.get('format_version')}, this code reads {FORMAT_VERSION}")
        if meta.get("config_fingerprint") != self.fingerprint and not allow_config_mismatch:
            raise CheckpointConfigMismatchError(self._mismatch_message(step, meta, saving=False))

        targets = {"model": model, "opt_state": opt_state, "rng": rng}
        args: dict[str, Any] = {"data": ocp.args.JsonRestore()}
        plans: dict[str, tuple[Any, list[tuple[str, ...]], list[Any]]] = {}
        for name, target in targets.items():
            if target is None:
                continue
            flat = _flat_paths(target)
            if not flat:
                continue
            if name not in meta["items"]:
                raise CheckpointStructureError(
                    f"checkpoint step {step} in {self.directory} has no {name!r} (saved items: "
                    f"{meta['items']}); pass {name}=None to restore without it")
            self._check_structure(step, name, flat)
            abstract = {names: _abstract_leaf(leaf) for names, leaf in flat}
            args[name] = ocp.args.StandardRestore(_nest(abstract))
            treedef = jax.tree_util.tree_structure(target)
            plans[name] = (treedef, [n for n, _ in flat], [leaf for _, leaf in flat])
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointError(f"restoring step {step} from {self.directory} failed: "
                                  f"{type(e).__name__}: {e}") from e

        out: dict[str, Any] = {}
        for name, (treedef, names_list, target_leaves) in plans.items():
            tree = restored[name]
            impls = meta.get("key_impls", {}).get(name, {})
            leaves = []
            for names, tleaf in zip(names_list, target_leaves):
                leaf = tree
                for n in names:
                    leaf = leaf[n]
                path = "/".join(names)
                if path in impls and _is_key_dtype(getattr(tleaf, "dtype", None)):
                    leaf = jax.random.wrap_key_data(leaf, impl=impls[path])
                leaves.append(leaf)
            out[name] = jax.tree_util.tree_unflatten(treedef, leaves)
        per_process = restored["data"]["per_process"]
        if merge_data_states is not None and any(st is not None for st in per_process):
            data_state = merge_data_states(per_process)
        else:
            data_state = self._this_process_data_state(step, per_process)
        return Restored(step=step, model=out.get("model"), opt_state=out.get("opt_state"),
                        rng=out.get("rng"), data_state=data_state,
                        metrics=meta.get("metrics") or None, meta=meta)

    def _this_process_data_state(self, step: int, per_process: list) -> dict | None:
        if all(s is None for s in per_process):
            return None
        if len(per_process) != jax.process_count():
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds the data loader state of "
                f"{len(per_process)} processes, this run has {jax.process_count()}: each process "
                f"reads its own shards, so the loader position cannot be carried over. Resume "
                f"with {len(per_process)} processes, or restore with a new data order (start the "
                f"loader fresh, e.g. with a different loader seed).")
        return per_process[jax.process_index()]

    def _check_structure(self, step: int, name: str, flat: list[tuple[tuple[str, ...], Any]]) -> None:
        """Compare the target's array names/shapes with the checkpoint's metadata."""
        try:
            md = self._manager.item_metadata(step)[name]
        except Exception:  # metadata unavailable: let Orbax report problems
            return
        md = getattr(md, "tree", md)
        if md is None:
            return
        saved = {"/".join(path_names(p)): getattr(m, "shape", None)
                 for p, m in jax.tree_util.tree_leaves_with_path(
                     md, is_leaf=lambda x: hasattr(x, "shape"))}
        target = {}
        for names, leaf in flat:
            shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
            if _is_key_dtype(getattr(leaf, "dtype", None)):
                shape = tuple(jax.eval_shape(jax.random.key_data,
                                             jax.ShapeDtypeStruct(shape, leaf.dtype)).shape)
            target["/".join(names)] = shape
        missing = sorted(set(target) - set(saved))
        extra = sorted(set(saved) - set(target))
        shapes = sorted(k for k in set(saved) & set(target)
                        if saved[k] is not None and tuple(saved[k]) != target[k])
        if missing or extra or shapes:
            parts = []
            if missing:
                parts.append(f"in the target but not the checkpoint: {missing[:10]}")
            if extra:
                parts.append(f"in the checkpoint but not the target: {extra[:10]}")
            if shapes:
                parts.append("different shapes (checkpoint vs target): " + ", ".join(
                    f"{k} {tuple(saved[k])} vs {target[k]}" for k in shapes[:10]))
            raise CheckpointStructureError(
                f"checkpoint step {step} in {self.directory}: {name!r} does not match the restore "
                f"target; " + "; ".join(parts) + ". The model code changed since the checkpoint "
                "was written, or the target was built from another config.")

    # ------------------------------------------------------------------ messages

    def _mismatch_message(self, step: int, meta: dict, *, saving: bool) -> str:
        saved = flatten_config(meta.get("model_config", {}))
        current = flatten_config(self.model_config)
        diff = config_diff(saved, current)
        lines = [f"  {k}: checkpoint {a!r}, current {b!r}" for k, a, b in diff[:20]]
        if len(diff) > 20:
            lines.append(f"  ... and {len(diff) - 20} more")
        hint = " ".join(f"{self.config_prefix}.{k}={json.dumps(a)}" for k, a, _ in diff[:5]
                        if a != "<absent>")
        what = ("refusing to save into" if saving else "cannot restore from")
        return (
            f"{what} {self.directory}: its checkpoint step {step} was written by a different "
            f"model config (fingerprint {meta.get('config_fingerprint')}, current "
            f"{self.fingerprint}). Differing keys:\n" + "\n".join(lines) + "\n"
            "To resume that run, launch with the checkpoint's model config"
            + (f" (e.g. {hint})" if hint else "") + "; to train this config, use a new "
            "checkpoint directory (or move the old checkpoints away).")

    def _no_step_message(self, step: int) -> str:
        steps = self.all_steps()
        return (f"no checkpoint step {step} in {self.directory} "
                f"(available: {steps if steps else 'none'})")


# --------------------------------------------------------------------------- preemption

from tml.train.preemption import PreemptionHandler, install_preemption_handler  # noqa: E402,F401


__all__ = [
    "Checkpointer", "CheckpointConfig", "Restored", "CheckpointError", "NoCheckpointError",
    "CheckpointSaveError", "CheckpointConfigMismatchError", "CheckpointStructureError",
    "config_fingerprint", "config_diff", "flatten_config", "config_to_dict", "to_storable",
    "with_shardings", "install_preemption_handler", "PreemptionHandler",
]
