"""Preemption: SIGTERM (the scheduler's notice) → a final checkpoint at a step boundary and a
clean exit.

The signal handler only sets a flag; :meth:`PreemptionHandler.check`, called between two
steps, runs the save callback there (where params, optimizer state, step and loader state
are consistent) and raises ``SystemExit`` so ``finally`` blocks and context managers run. In a
multi-process run the flags are OR-ed across processes, so every process saves the same step
even if only one was signalled. Independent of the checkpoint format: the callback is any
blocking save (e.g. ``Checkpointer.save(..., wait=True)``).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np


class PreemptionHandler:
    """Turns SIGTERM (the scheduler's preemption notice) into a final save at a step
    boundary and a clean exit. See :func:`install_preemption_handler`."""

    def __init__(self, callback: Callable[[], Any], signals: Sequence[int], exit_code: int,
                 immediate: bool, sync_every: int):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.callback, self.exit_code, self.immediate = callback, exit_code, immediate
        self.signals, self.sync_every = tuple(signals), sync_every
        self._checks = 0
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._ran = False
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    @property
    def requested(self) -> bool:
        """A preemption signal has arrived (this process)."""
        return self._event.is_set()

    def _on_signal(self, signum, frame) -> None:
        self._event.set()
        print(f"[tml] received signal {signum}: saving a final checkpoint, then exiting",
              file=sys.stderr, flush=True)
        if self.immediate:
            self._save_and_exit()

    def check(self) -> None:
        """Call once per step, between steps. If a preemption signal has arrived, run the
        callback and exit with ``exit_code``.

        In a multi-process run every process must call it at every step: every
        ``sync_every``-th call the flags are OR-ed across processes (a tiny all-gather, which
        waits for the devices), so all processes save the same step together even if only
        one was signalled; in between, the signal is noted but not acted on."""
        self._checks += 1
        requested = self.requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if self._checks % self.sync_every:
                return

            flags = multihost_utils.process_allgather(np.array([requested], np.int32))
            requested = bool(np.any(np.asarray(flags)))
        if requested:
            self._save_and_exit()

    def _save_and_exit(self) -> None:
        if not self._ran:
            self._ran = True
            self.callback()
        raise SystemExit(self.exit_code)

    def uninstall(self) -> None:
        """Restore the previous signal handlers."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def install_preemption_handler(
    callback: Callable[[], Any],
    *,
    signals: Sequence[int] = (signal.SIGTERM,),
    exit_code: int = 0,
    immediate: bool = False,
    sync_every: int = 1,
) -> PreemptionHandler:
    """Install a handler for ``signals`` (default SIGTERM) that runs ``callback`` (the final
    save; it should block until the checkpoint is committed, e.g. ``save(..., wait=True)``)
    and exits with ``SystemExit(exit_code)``, so ``finally`` blocks and context managers run.

    By default the signal only sets a flag and the save happens at the next
    :meth:`PreemptionHandler.check` — between two steps, where params, optimizer state, step
    and loader state are consistent. ``immediate=True`` saves inside the signal handler
    instead (for loops that cannot call ``check``; the callback then sees whatever state the
    interrupted code had). Must be called from the main thread.

    Multi-process runs: a signal reaching only some processes is propagated by
    :meth:`check`, which all processes call at every step; the cross-process agreement runs
    every ``sync_every`` steps (it synchronises host and devices, so on accelerators pick
    e.g. 10-50: the grace period of a preemption notice is tens of seconds). ``immediate=True``
    is unsafe there: the save is collective.
    """
    return PreemptionHandler(callback, signals, exit_code, immediate, sync_every)


__all__ = ["PreemptionHandler", "install_preemption_handler"]
