"""Per-micro-turn credit: a scorer that localises its event gives its share of the reward
to the micro-turns around it, a scorer with one number per window spreads it, and each
token gets the advantage of its micro-turn (tml.rl.rewards, tml.rl.learner)."""

import dataclasses
import types

import numpy as np
import pytest
from tml.eval.policies import targets
from tml.eval.run import prepare
from tml.eval.scenarios import SILENT, score

from tml.rl.config import RLConfig
from tml.rl.learner import micro_turn_advantages, token_advantages
from tml.rl.rewards import credit_region, episode_reward, task_shares
from tml.rl.rollout import Episode

W = {"turn_taking_tor": 1.0, "pause_tor": 1.0, "backchannel_frequency": 1.0}


def out(n_tokens):
    return types.SimpleNamespace(positions=np.arange(n_tokens))


def episode(group, rows, n, tokens_per_mt=2):
    e = Episode(group, f"e{group}", [out(tokens_per_mt) for _ in range(n)], [], rows)
    e.keys = list(range(len(rows)))
    e.reward, e.values = episode_reward(rows, W)
    return e


def test_shares_sum_to_the_episode_reward_and_come_from_the_scorers():
    tt = prepare("turn_taking", 0, 0)
    rows = score(tt.ref, targets(tt.micro_turns), credit=True)
    shares = task_shares(rows, W)
    assert sum(shares) == pytest.approx(episode_reward(rows, W)[0])
    assert all(len(r["credit"]) == r["window"][1] - r["window"][0] for r in rows)  # the scorer's own list
    assert score(tt.ref, targets(tt.micro_turns)) == [{k: v for k, v in r.items() if k != "credit"} for r in rows]


def test_region_is_around_the_credited_micro_turns_or_the_whole_window():
    row = {"task": "smooth_turn_taking", "window": [10, 30], "credit": [0.0] * 5 + [-1.0] + [0.0] * 14}
    region, localised = credit_region(row, 2)
    assert localised and np.flatnonzero(region).tolist() == [3, 4, 5, 6, 7]
    held = {"task": "pause_handling", "window": [0, 8], "credit": [0.0] * 8}          # pause held in silence
    region, localised = credit_region(held, 2)
    assert not localised and region.all()
    assert credit_region({"task": "backchannel", "window": [0, 4]}, 2)[0].all()        # no credit at all
    with pytest.raises(ValueError, match="credit values for a window"):
        credit_region({"task": "x", "window": [0, 4], "credit": [1.0]}, 2)


def test_micro_turn_advantages_by_hand():
    """Two episodes of a group, a turn task (localised) and a backchannel task (spread).
    Episode 0 took the turn (credit at micro-turns 3..5), episode 1 did not (credit at 3)."""
    n = 12
    turn0 = {"task": "smooth_turn_taking", "window": [2, 8], "tor": 1, "latency": 0.4,
             "credit": [0, -0.2, -0.2, 1.0, 0, 0]}
    turn1 = {"task": "smooth_turn_taking", "window": [2, 8], "tor": 0, "latency": None,
             "credit": [0, -1.0, 0, 0, 0, 0]}
    bc0 = {"task": "backchannel", "window": [8, 12], "tor": 0, "frequency": 0.5, "jsd": 1.0}
    bc1 = {"task": "backchannel", "window": [8, 12], "tor": 0, "frequency": 0.0, "jsd": 1.0}
    eps = [episode(0, [turn0, bc0], n), episode(0, [turn1, bc1], n)]
    c = dataclasses.replace(RLConfig(), rewards=W, credit="micro_turn", credit_radius=1, std_normalize=False)
    a0, a1 = micro_turn_advantages(eps, c)
    # turn shares 1 vs 0 (mean 0.5) -> +-0.5 on the region; backchannel 0.5 vs 0 -> +-0.25 on its window
    expect0 = np.zeros(n)
    expect0[2:7] += 0.5      # credit at window 1..3 -> micro-turns 3..5, radius 1 -> 2..6
    expect0[8:12] += 0.25
    expect1 = np.zeros(n)
    expect1[2:5] -= 0.5      # credit at window 1 -> micro-turn 3, radius 1 -> 2..4
    expect1[8:12] -= 0.25
    np.testing.assert_allclose(a0, expect0, atol=1e-7)
    np.testing.assert_allclose(a1, expect1, atol=1e-7)
    # GRPO: divided by the root mean square of the differences (0.5, 0.5, 0.25, 0.25)
    g = micro_turn_advantages(eps, dataclasses.replace(c, std_normalize=True))
    np.testing.assert_allclose(g[0], expect0 / (np.sqrt((0.25 + 0.25 + 0.0625 + 0.0625) / 4) + 1e-6), rtol=1e-6)
    # tokens: each of a micro-turn's tokens gets its advantage, at slot p - 1
    pos = [np.arange(1, 2 * n + 1), np.arange(1, 2 * n + 1)]
    tok = token_advantages(eps, c, pos, (2, 2 * n + 4))
    np.testing.assert_allclose(tok[0, :2 * n], np.repeat(expect0, 2), atol=1e-7)
    assert np.all(tok[:, 2 * n:] == 0)
    # episode credit: one number on every token
    ep = token_advantages(eps, dataclasses.replace(c, credit="episode"), pos, (2, 2 * n + 4))
    assert np.all(ep[0, :2 * n] == ep[0, 0]) and ep[0, 0] > 0 > ep[1, 0]


def test_equal_episodes_get_no_advantage_and_missing_tasks_are_skipped():
    """A task only one episode has (a repeated question) is its own baseline: 0."""
    row = {"task": "pause_handling", "window": [0, 6], "tor": 1, "credit": [0, -1.0, 0, 0, 0, 0]}
    extra = {"task": "smooth_turn_taking", "window": [6, 10], "tor": 0, "latency": None, "credit": [-1.0, 0, 0, 0]}
    a, b = episode(0, [row], 10), episode(0, [row, extra], 10)
    c = dataclasses.replace(RLConfig(), rewards=W, credit="micro_turn")
    for x in micro_turn_advantages([a, b], c):
        assert np.all(x == 0)


def test_silence_on_a_pause_is_credited_over_the_paused_turn():
    mp = prepare("mid_pause", 0, 0)
    rows = score(mp.ref, [SILENT] * mp.ref.n_micro_turns, credit=True)
    (row,) = [r for r in rows if r["task"] == "pause_handling"]
    region, localised = credit_region(row, 3)
    assert row["tor"] == 0 and not localised and region.all()
