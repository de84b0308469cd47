"""Checkpoint errors; each message names the directory, the step and what to do next."""

from __future__ import annotations

from pathlib import Path


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


def save_failed_message(directory: Path, step: int | None, last_good: int | None,
                        e: BaseException) -> str:
    """The :class:`CheckpointSaveError` text: the failed step, the last good one (untouched)
    and the fix (disk space / permissions for an ``OSError`` anywhere in the cause chain)."""
    if last_good is not None and last_good != step:
        kept = (f"The last good checkpoint, step {last_good} ({directory / str(last_good)}), "
                f"is untouched and is what restore() returns.")
    else:
        kept = f"No earlier checkpoint exists in {directory}."
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    advice = (f"Check free disk space and write permission of {directory}, then resume from "
              f"the last good checkpoint." if isinstance(cause, OSError) else
              "The state handed to save() could not be written (see the error above); the files "
              "on disk were not changed.")
    return (f"saving checkpoint step {step} to {directory} failed: {type(e).__name__}: {e}. "
            f"{kept} {advice}")


def no_step_message(directory: Path, step: int, steps: list[int]) -> str:
    """The :class:`NoCheckpointError` text for a missing ``step``, listing the available ones."""
    return (f"no checkpoint step {step} in {directory} "
            f"(available: {steps if steps else 'none'})")
