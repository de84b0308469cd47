"""Per-conversation scores -> per-task summary, a plain dict for ``eval.json``.

Every scorer in ``tml.eval`` returns one flat dict per conversation. A value of
``None`` means "not defined for this conversation" and is **skipped** by the mean,
which is exactly how Full-Duplex-Bench averages: latency exists only where TOR = 1
and its mean divides by the number of TOR = 1 samples; TOR, frequency and JSD exist
for every sample and are averaged over all of them.

For each key of the per-conversation dicts, :func:`summarize` gives

* numbers and bools: ``key`` = mean over the non-``None`` values (``None`` if there are
  none), ``key_std`` = population standard deviation (``np.std``, as FD-bench prints
  for backchannel), ``key_n`` = how many values were averaged;
* strings (a category such as an overlap behaviour): ``key`` = ``{category: fraction}``
  over the non-``None`` values, ``key_n`` = their number;
* anything else (per-micro-turn ``credit`` lists, interval lists) is not summarised.

``n`` is the number of conversations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary of one task's per-conversation results (module docstring)."""
    summary: dict[str, Any] = {"n": len(results)}
    keys: list[str] = []
    for r in results:
        keys.extend(k for k in r if k not in keys)
    for key in keys:
        present = [r[key] for r in results if r.get(key) is not None]
        if all(isinstance(v, (Real, np.number)) for v in present):
            values = np.asarray(present, dtype=np.float64)
            summary[key] = float(np.mean(values)) if present else None
            summary[f"{key}_std"] = float(np.std(values)) if present else None
            summary[f"{key}_n"] = len(present)
        elif all(isinstance(v, str) for v in present):
            cats = sorted(set(present))
            summary[key] = {c: present.count(c) / len(present) for c in cats}
            summary[f"{key}_n"] = len(present)
    return summary


def aggregate(per_task: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{task: [result, ...]}`` -> ``{task: summarize(results)}`` (JSON-ready)."""
    return {task: summarize(results) for task, results in per_task.items()}
