"""The :class:`Checkpointer`: an Orbax ``CheckpointManager`` over the five items of a step
(see the package docstring), with atomic async saves, retention and the config guard.

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

**Readers.** Opening a directory for writing cleans up unfinished ``*.orbax-checkpoint-tmp``
saves, which, while a trainer is still saving there, are *its* save in progress. Every
reader of another process's run (``tml eval``/``serve``/``divergence``/``rl`` loading
weights, :func:`tml.eval.checkpoint.load_model`) therefore opens with
:meth:`Checkpointer.open_read_only` (``read_only=True``): Orbax's read-only manager, no
cleanup, no directory or metadata created, no async thread, and ``save`` refused.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from tml.train.checkpoint.errors import (
    CheckpointConfigMismatchError,
    CheckpointError,
    CheckpointSaveError,
    CheckpointStructureError,
    NoCheckpointError,
    no_step_message,
    save_failed_message,
)
from tml.train.checkpoint.fingerprint import (
    checkpointed_model_config,
    config_fingerprint,
    mismatch_message,
)
from tml.train.checkpoint.gather import gather_json, jsonable_state
from tml.train.checkpoint.retention import retention_options
from tml.train.checkpoint.storable import (
    abstract_storable,
    flat_paths,
    from_storable,
    structure_mismatch,
    to_storable,
)
from tml.train.config import CheckpointConfig

FORMAT_VERSION = 1
ARRAY_ITEMS = ("model", "opt_state", "rng")


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
    """Saves and restores training state in ``directory`` (see :mod:`tml.train.checkpoint`).

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
        read_only: bool = False,
    ):
        import orbax.checkpoint as ocp

        retention = retention_options(keep_last, keep_best, best_metric, best_mode)
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise NoCheckpointError(f"no checkpoint directory {self.directory} to read: pass the checkpoints "
                                    "directory a training run wrote (its checkpoint.dir)")
        self.model_config = checkpointed_model_config(model_config)
        self.fingerprint = config_fingerprint(self.model_config)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.keep_last, self.keep_best = keep_last, keep_best
        self.config_prefix = config_prefix
        self._directory_checked = False
        self._pending_step: int | None = None

        if read_only:  # Orbax would drop these itself (with a warning each); a reader keeps every step
            retention = {**{k: v for k, v in retention.items() if k != "preservation_policy"},
                         "save_interval_steps": 0}
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
            **retention,
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

    @classmethod
    def open_read_only(cls, directory: str | os.PathLike, *, model_config: Any = None,
                       config_prefix: str = "model") -> Checkpointer:
        """A reader of ``directory`` that never writes, never deletes and never cleans up
        another process's unfinished save (see *Readers* in the module docstring):
        queries and :meth:`restore` as usual; :meth:`save` raises :class:`CheckpointSaveError`."""
        import logging

        absl = logging.getLogger("absl")   # Orbax warns "Given directory is read only" at every opening
        level = absl.level
        absl.setLevel(max(level, logging.ERROR))
        try:
            return cls(directory, model_config=model_config, async_save=False, config_prefix=config_prefix,
                       read_only=True)
        finally:
            absl.setLevel(level)

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
            raise NoCheckpointError(no_step_message(self.directory, step, self.all_steps()))
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
        if self.read_only:
            raise CheckpointSaveError(f"cannot save step {step}: {self.directory} was opened read-only "
                                      "(Checkpointer.open_read_only, for readers of a run another process may "
                                      "be writing); open it with Checkpointer(...) in the one process that owns it")
        if not self._directory_checked:
            self._check_directory_config()
        self._wait_previous()
        if step in self.all_steps(include_pending=True):
            raise CheckpointSaveError(f"checkpoint step {step} already exists in {self.directory}; "
                                      f"steps are never overwritten")
        metrics = {k: float(np.asarray(v)) for k, v in (metrics or {}).items()}
        data_states = gather_json(jsonable_state(data_state))
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
            raise CheckpointSaveError(self._save_failed_message(step, e)) from e
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
            raise CheckpointSaveError(self._save_failed_message(step, e)) from e

    def _save_failed_message(self, step: int | None, e: BaseException) -> str:
        return save_failed_message(self.directory, step, self.latest_step(), e)

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

    def _check_directory_config(self) -> None:
        """Refuse to mix checkpoints of two model configs in one directory."""
        latest = self.latest_step()
        if latest is not None:
            meta = self.read_meta(latest)
            if meta.get("config_fingerprint") != self.fingerprint:
                raise CheckpointConfigMismatchError(self._mismatch_message(latest, meta, saving=True))
        self._directory_checked = True

    def _mismatch_message(self, step: int, meta: dict, *, saving: bool) -> str:
        return mismatch_message(self.directory, step, meta, model_config=self.model_config,
                                fingerprint=self.fingerprint, config_prefix=self.config_prefix,
                                saving=saving)

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

        ``model`` / ``opt_state`` / ``rng`` are targets (see
        :mod:`tml.train.checkpoint.storable`, *restore onto any mesh*); an item whose target
        is ``None`` is not read (e.g. ``opt_state=None`` for evaluation).
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
        read: dict[str, Any] = {}  # item name -> its restore target
        for name, target in targets.items():
            if target is None:
                continue
            flat = flat_paths(target)
            if not flat:
                continue
            if name not in meta["items"]:
                raise CheckpointStructureError(
                    f"checkpoint step {step} in {self.directory} has no {name!r} (saved items: "
                    f"{meta['items']}); pass {name}=None to restore without it")
            self._check_structure(step, name, flat)
            args[name] = ocp.args.StandardRestore(abstract_storable(flat))
            read[name] = target
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointError(f"restoring step {step} from {self.directory} failed: "
                                  f"{type(e).__name__}: {e}") from e

        out = {name: from_storable(restored[name], target, meta.get("key_impls", {}).get(name, {}))
               for name, target in read.items()}
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
        parts = structure_mismatch(md, flat)
        if parts:
            raise CheckpointStructureError(
                f"checkpoint step {step} in {self.directory}: {name!r} does not match the restore "
                f"target; " + "; ".join(parts) + ". The model code changed since the checkpoint "
                "was written, or the target was built from another config.")
