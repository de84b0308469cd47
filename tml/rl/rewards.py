"""Rewards: the eval scorers' numbers, weighted (no metric is computed here).

An episode is scored by :func:`tml.eval.scenarios.score` (its reference's tasks on the
engine's outputs: the same timeline and scorers ``tml eval`` uses). Each reward name
reads one number of one task, with the direction that makes larger better:

=========================  =======================  ===========  =========
reward                     task                     value        sign
=========================  =======================  ===========  =========
``turn_taking_tor``        smooth_turn_taking       tor          +1
``turn_taking_latency``    smooth_turn_taking       latency (s)  -1
``pause_tor``              pause_handling           tor          -1
``background_tor``         background_takeover      tor          -1
``interruption_tor``       user_interruption        tor          +1
``interruption_latency``   user_interruption        latency (s)  -1
``backchannel_tor``        backchannel              tor          -1
``backchannel_frequency``  backchannel              frequency    +1
``backchannel_jsd``        backchannel              jsd          -1
``cue_speak_accuracy``     cue_speak                accuracy     +1
``cue_speak_latency``      cue_speak                latency (s)  -1
``time_speak_accuracy``    time_speak               accuracy     +1
``time_speak_error``       time_speak               timing_error -1
``rep_count_abs_error``    rep_count                abs_error    -1
``rep_count_obo``          rep_count                obo          +1
=========================  =======================  ===========  =========

An episode's reward is ``sum_name weight * sign * mean(values)`` over its tasks of that
name whose value is defined (a latency is ``None`` when TOR = 0, FD-bench's rule); a
reward with no defined value in the episode adds 0. Per-micro-turn credit (the scorers'
``credit`` lists) is not used yet: every token of an episode gets the episode's advantage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

REWARDS: dict[str, tuple[str, str, float]] = {
    "turn_taking_tor": ("smooth_turn_taking", "tor", 1.0),
    "turn_taking_latency": ("smooth_turn_taking", "latency", -1.0),
    "pause_tor": ("pause_handling", "tor", -1.0),
    "background_tor": ("background_takeover", "tor", -1.0),
    "interruption_tor": ("user_interruption", "tor", 1.0),
    "interruption_latency": ("user_interruption", "latency", -1.0),
    "backchannel_tor": ("backchannel", "tor", -1.0),
    "backchannel_frequency": ("backchannel", "frequency", 1.0),
    "backchannel_jsd": ("backchannel", "jsd", -1.0),
    "cue_speak_accuracy": ("cue_speak", "accuracy", 1.0),
    "cue_speak_latency": ("cue_speak", "latency", -1.0),
    "time_speak_accuracy": ("time_speak", "accuracy", 1.0),
    "time_speak_error": ("time_speak", "timing_error", -1.0),
    "rep_count_abs_error": ("rep_count", "abs_error", -1.0),
    "rep_count_obo": ("rep_count", "obo", 1.0),
}


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``rl.rewards`` → a plain dict; unknown names are an error listing the known ones."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"rl.rewards: unknown reward names {unknown}; known: {sorted(REWARDS)}")
    if not weights:
        raise ValueError(f"rl.rewards is empty: give at least one of {sorted(REWARDS)} with a weight")
    return {k: float(v) for k, v in weights.items()}


def reward_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """An episode's scored task rows (``tml.eval.scenarios.score``) → ``{reward name:
    sign * mean value}`` for every reward with a defined value."""
    out = {}
    for name, (task, key, sign) in REWARDS.items():
        vals = [float(r[key]) for r in rows if r["task"] == task and r.get(key) is not None]
        if vals:
            out[name] = sign * float(np.mean(vals))
    return out


def episode_reward(rows: Sequence[Mapping[str, Any]], weights: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """→ (the weighted reward, the per-name signed values it was made of)."""
    values = reward_values(rows)
    return float(sum(w * values.get(name, 0.0) for name, w in weights.items())), values


__all__ = ["REWARDS", "check_weights", "episode_reward", "reward_values"]
