"""Which steps are kept: keep-last plus keep-best, as Orbax preservation policies.

**Retention.** After each committed save, keep the ``keep_last`` most recent steps plus the
``keep_best`` steps with the best ``best_metric`` among steps saved with that metric
(``best_mode`` ``"min"`` or ``"max"``; NaN counts as worst). Older steps are
garbage-collected by Orbax only after the new step is committed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping


def check_retention(keep_last: int, keep_best: int, best_mode: str) -> None:
    """Raise ``ValueError`` for a retention setting that cannot work."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the latest checkpoint is what a restart "
                         f"resumes from), got {keep_last}")
    if keep_best < 0:
        raise ValueError(f"keep_best must be >= 0, got {keep_best}")
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")


def metric_fn(best_metric: str, best_mode: str) -> Callable[[Mapping[str, Any]], float]:
    """A step's metrics → its ``best_metric`` value; missing or NaN → the worst value
    (``+inf`` for ``"min"``, ``-inf`` for ``"max"``)."""
    worst = math.inf if best_mode == "min" else -math.inf

    def metric_value(metrics: Mapping[str, Any]) -> float:
        v = float(metrics.get(best_metric, worst))
        return worst if math.isnan(v) else v

    return metric_value


def retention_options(keep_last: int, keep_best: int, best_metric: str,
                      best_mode: str) -> dict[str, Any]:
    """The retention keyword arguments of ``ocp.CheckpointManagerOptions``
    (``preservation_policy``, ``best_fn``, ``best_mode``)."""
    from orbax.checkpoint import checkpoint_managers as cm

    check_retention(keep_last, keep_best, best_mode)
    metric_value = metric_fn(best_metric, best_mode)
    policies = [cm.LatestN(n=keep_last)]
    if keep_best > 0:
        # BestN keeps the *last* n after sorting; for "min" sort descending.
        policies.append(cm.BestN(get_metric_fn=metric_value, reverse=(best_mode == "min"),
                                 n=keep_best, keep_checkpoints_without_metrics=False))
    return dict(preservation_policy=cm.AnyPreservationPolicy(policies),
                best_fn=metric_value if keep_best > 0 else None, best_mode=best_mode)
