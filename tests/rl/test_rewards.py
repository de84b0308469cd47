"""Rewards are the eval scorers' numbers (imported, not re-implemented), episodes are cut
scenarios, and bad reward names are refused."""

import pytest

import tml.eval.scenarios as scenarios
import tml.rl.rollout as rollout
from tml.eval.policies import targets
from tml.eval.run import prepare
from tml.rl.episodes import cut_reference, step_groups
from tml.rl.rewards import REWARDS, check_weights, episode_reward, reward_values


def test_rewards_are_scored_by_the_eval_module():
    assert rollout.score is scenarios.score


def test_every_reward_reads_a_task_the_scenarios_produce():
    from tml.data_pipelines.scenarios import SCENARIOS

    tasks = {t.name for sc in SCENARIOS for t in prepare(sc, 0, 0).ref.tasks}
    assert {task for task, _, _ in REWARDS.values()} <= tasks


def test_oracle_beats_silence_on_turn_taking_and_pauses():
    """The scripted targets take every turn and never the pause (reward +1, -0); silence
    takes no turn (0)."""
    tt, mp = prepare("turn_taking", 0, 0), prepare("mid_pause", 0, 0)
    oracle_tt = reward_values(scenarios.score(tt.ref, targets(tt.micro_turns)))
    silent_tt = reward_values(scenarios.score(tt.ref, [scenarios.SILENT] * tt.ref.n_micro_turns))
    assert oracle_tt["turn_taking_tor"] == 1.0 and silent_tt["turn_taking_tor"] == 0.0
    assert "turn_taking_latency" in oracle_tt and "turn_taking_latency" not in silent_tt  # None when TOR = 0
    assert reward_values(scenarios.score(mp.ref, targets(mp.micro_turns)))["pause_tor"] == 0.0
    rows = scenarios.score(tt.ref, targets(tt.micro_turns))
    total, values = episode_reward(rows, {"turn_taking_tor": 2.0, "pause_tor": 1.0})
    assert total == 2.0 and "pause_tor" not in values  # a reward the episode has no task for adds 0


def test_unknown_or_empty_rewards_are_refused():
    with pytest.raises(ValueError, match="unknown reward names .'turn_taking_to'.*known"):
        check_weights({"turn_taking_to": 1.0})
    with pytest.raises(ValueError, match="rl.rewards is empty"):
        check_weights({})


def test_cut_keeps_the_tasks_that_end_in_time():
    ref = prepare("turn_taking", 0, 0).ref            # windows end at 22, 45, 64
    cut = cut_reference(ref, 45)
    assert cut.n_micro_turns == 45 and [t.t1 for t in cut.tasks] == [22, 45]
    assert cut_reference(ref, 10) is None and cut_reference(ref, 0) is ref


def test_groups_share_inputs_and_differ_in_seeds():
    groups, skipped, counters = step_groups(["turn_taking", "mid_pause"], 0, {}, 3, 45)
    assert [g.scenario for g in groups] == ["turn_taking", "mid_pause"] and sum(counters.values()) == 2 + len(skipped)
    for g in groups:
        assert len({s.seed for s in g.episodes}) == 3
        assert all(len(s.inputs) == g.ref.n_micro_turns <= 45 for s in g.episodes)
        assert all(s.inputs is g.episodes[0].inputs for s in g.episodes)
    again, _, _ = step_groups(["turn_taking", "mid_pause"], 0, counters, 3, 45)
    assert all(a.index != b.index for a, b in zip(groups, again))  # the counter moves on
    with pytest.raises(ValueError, match="rl.scenarios"):
        step_groups(["turn_takin"], 0, {}, 2, 45)
