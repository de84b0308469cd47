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
reward with no defined value in the episode adds 0.

**Per-micro-turn credit** (``rl.credit=micro_turn``). Task row ``i`` of an episode adds
``share_i = sum_name weight * sign * value_i / m_name`` to the episode's reward (``m_name``
the episode's defined values of that name; the shares sum to the reward). Its **region**
(:func:`credit_region`) is where that share is earned: a scorer that localises its event
returns a per-micro-turn ``credit`` list (turn-taking and interruption: the micro-turns
from the reference time to the response onset, or the reference time when no turn was
taken; pause handling and background takeover: the micro-turns the model's words start
in; CueSpeak / TimeSpeak: the response or the cue) and the region is its non-zero
micro-turns widened by ``rl.credit_radius`` on each side, inside the task's window; a
scorer with one number per window (backchannel, RepCount, a pause held in silence:
all-zero credit) spreads it over its whole window. :func:`tml.rl.learner.token_advantages`
turns the shares into per-token advantages.
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


def task_shares(rows: Sequence[Mapping[str, Any]], weights: Mapping[str, float]) -> list[float]:
    """Each task row's share of :func:`episode_reward` (module docstring); they sum to it."""
    shares = [0.0] * len(rows)
    for name, w in weights.items():
        task, key, sign = REWARDS[name]
        idx = [i for i, r in enumerate(rows) if r["task"] == task and r.get(key) is not None]
        for i in idx:
            shares[i] += w * sign * float(rows[i][key]) / len(idx)
    return shares


def credit_region(row: Mapping[str, Any], radius: int) -> tuple[np.ndarray, bool]:
    """A scored row (``tml.eval.scenarios.score(..., credit=True)``) → (bool [t1 - t0]
    micro-turns of its window its share is earned in, whether the scorer localised it)."""
    t0, t1 = row["window"]
    credit = np.asarray(row.get("credit") or [], np.float64)
    if credit.size and np.any(credit != 0):
        if credit.size != t1 - t0:
            raise ValueError(f"task {row['task']}: {credit.size} credit values for a window of {t1 - t0} micro-turns")
        hit = np.flatnonzero(credit != 0)
        region = np.zeros(t1 - t0, bool)
        for t in hit:
            region[max(0, t - radius):t + radius + 1] = True
        return region, True
    return np.ones(t1 - t0, bool), False


__all__ = ["REWARDS", "check_weights", "credit_region", "episode_reward", "reward_values", "task_shares"]
