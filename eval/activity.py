"""What a policy did, micro-turn by micro-turn, beside what the scenario's targets did.

The interactivity scorers (:mod:`tml.eval.fdb_v1`, :mod:`~tml.eval.overlap`,
:mod:`~tml.eval.tasks`) read words and times; a policy that never emits a word scores the
same as one that emits gibberish without spaces on many of them (both give no usable
answer). :func:`activity` says *how* a policy failed, per conversation of ``n``
micro-turns, from its outputs and the targets (``Sample.script``, the oracle's outputs):

* ``speaking_rate`` / ``text_rate`` / ``control_rate``: fraction of micro-turns with speech
  frames / with text bytes / with a control token (the targets' own rates are
  ``target_speaking_rate`` ...);
* ``text_bytes``: text bytes per micro-turn;
* ``speaking_agreement``: fraction of micro-turns where speech vs ``<silence>`` matches the
  target (always-silent scores ``1 - target_speaking_rate``, the oracle 1);
* ``speaking_f1`` / ``text_f1``: F1 of the micro-turns that speak / carry text against the
  target's (``None`` when neither side has any: nothing to get right).

These are descriptive (task ``activity`` in ``eval.json``), not benchmark metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tml.eval.scenarios import MicroTurnOutput


def _f1(pred: np.ndarray, want: np.ndarray) -> float | None:
    tp, n_pred, n_want = int((pred & want).sum()), int(pred.sum()), int(want.sum())
    if n_pred == 0 and n_want == 0:
        return None
    return 2 * tp / (n_pred + n_want)


def activity(outputs: Sequence[MicroTurnOutput], script: Sequence[MicroTurnOutput]) -> dict:
    """Per-conversation activity of ``outputs`` against the targets ``script`` (module
    docstring); both hold one :class:`MicroTurnOutput` per micro-turn."""
    if len(outputs) != len(script):
        raise ValueError(f"{len(outputs)} outputs for {len(script)} target micro-turns")
    n = max(len(outputs), 1)

    def arrays(xs):
        return (np.array([bool(o.speaking) for o in xs], bool), np.array([len(o.text) > 0 for o in xs], bool),
                np.array([len(o.control) > 0 for o in xs], bool))

    sp, tx, ct = arrays(outputs)
    tsp, ttx, tct = arrays(script)
    return {
        "task": "activity",
        "speaking_rate": float(sp.mean()) if len(sp) else 0.0,
        "text_rate": float(tx.mean()) if len(tx) else 0.0,
        "control_rate": float(ct.mean()) if len(ct) else 0.0,
        "text_bytes": sum(len(o.text) for o in outputs) / n,
        "target_speaking_rate": float(tsp.mean()) if len(tsp) else 0.0,
        "target_text_rate": float(ttx.mean()) if len(ttx) else 0.0,
        "speaking_agreement": float((sp == tsp).mean()) if len(sp) else 1.0,
        "speaking_f1": _f1(sp, tsp),
        "text_f1": _f1(tx, ttx),
    }
