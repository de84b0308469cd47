"""The model's loss on the held-out scenarios' targets (teacher forced), beside the policy scores.

A policy's interactivity scores say what it *did*; a 300-step model can have learned a
lot and still do nothing useful when decoding greedily (its most likely output in almost
every micro-turn is ``<silence>``, as it is in ~70% of the targets). :func:`target_nll`
says how much it learned on exactly the conversations it was scored on: each held-out
conversation with its target outputs (``tml.stream.to_micro_turns``) is laid out as one
row and scored by :func:`tml.sampler.score` (the trainer's full-row program; the
log-probs the engine would report, bit for bit, in ``batch_invariant`` mode), and the
per-kind losses are what ``tml train`` logs, on these rows:

* ``text`` / ``control``: mean negative log-probability of the target text bytes / control
  tokens (``<speak>``, ``<silence>``, ``<end>``, ``<backchannel>`` ...), nats per token;
* ``speech``: mean over target speech frames of the mean over the 80 mel channels of
  the negative log-probability of the target bin (the trainer's ``loss_speech``).

Row per conversation: ``{"task": "target_nll", "text", "speech", "control", "n_text", ...}``
(``None`` where the conversation has no target of that kind).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tml.stream import LossKind, MicroTurn


def target_nll(model, conversations: Sequence[Sequence[MicroTurn]], batch_size: int = 8) -> list[dict]:
    """One row per conversation (module docstring). ``conversations``: micro-turns holding
    inputs and target outputs; ``model``: an ``InteractionModel``."""
    from tml.sampler import score

    rows = []
    for s in score(model, [list(c) for c in conversations], batch_size=batch_size):
        kind = np.asarray(s.loss_kind)
        row: dict = {"task": "target_nll"}
        for name, k in (("text", LossKind.TEXT), ("control", LossKind.CONTROL)):
            m = kind == k
            row[name] = float(-s.token_logprobs[m].mean()) if m.any() else None
            row[f"n_{name}"] = int(m.sum())
        m = kind == LossKind.SPEECH
        row["speech"] = float(-s.speech_channel_logprobs[m].mean()) if m.any() else None
        row["n_speech"] = int(m.sum())
        rows.append(row)
    return rows
