"""``tml eval eval.episode_seconds=...``: held-out minutes-long episodes, the user reacting.

The tiny untrained test model plays two held-out long ``mid_pause`` episodes through
:func:`tml.eval.run.run` (the engine sized by the longest episode's KV need): each lasts
the requested duration, is made of consecutive held-out conversations (the second
episode going on where the first stopped, never the RL indices), is scored by the
scenario's scorer on the reference of what its user actually said, and says how often
its user reacted. An engine too small for an episode drops it with an error naming
``eval.max_context``; a scripted policy or an FD-bench folder is refused with what to do.
"""

from __future__ import annotations

import json

import pytest

from tests.model.tiny_model import CFG
from tml.eval.config import EvalConfig
from tml.eval.long_episodes import context_needed, groups_for
from tml.eval.run import run
from tml.eval.scenarios import HELD_OUT_INDEX_OFFSET
from tml.rl.episodes import RL_INDEX_OFFSET


def long_cfg(tmp_path, **kw) -> EvalConfig:
    base = dict(policy="untrained", scenarios=["mid_pause"], per_scenario=2, episode_seconds=45.0, batch_size=2,
                temperature=1.0, max_output_tokens=6, out=str(tmp_path / "{policy}"), progress=False, plots=False)
    return EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    return run(long_cfg(tmp), quiet=True, model_cfg=CFG, seed=0), tmp


def test_long_episodes_are_held_out_conversations_back_to_back_for_the_duration(long_run):
    result, tmp = long_run
    saved = json.loads((tmp / "untrained" / "eval.json").read_text())
    assert not saved["errors"], saved["errors"]
    samples = saved["samples"]
    assert len(samples) == 2 and all(s["scenario"] == "mid_pause" for s in samples)
    assert all(s["micro_turns"] >= 45 * 5 and s["conversations"] >= 2 for s in samples)
    first = saved["seeds"]["first_indices"]
    # the second episode goes on from the conversation after the first one's last
    assert first[0] == HELD_OUT_INDEX_OFFSET and first[1] >= first[0] + samples[0]["conversations"]
    assert all(HELD_OUT_INDEX_OFFSET <= i < RL_INDEX_OFFSET for i in first)
    assert result["timing"]["micro_turns"] == sum(s["micro_turns"] for s in samples)
    # the engine was sized by the longest episode's bound (whole pages), which it fitted
    groups, _ = groups_for(long_cfg(tmp), ["mid_pause"])
    need = context_needed(groups, 6)
    assert need <= saved["seeds"]["max_context"] < need + 64


def test_each_long_episode_is_scored_by_its_scenarios_scorer_and_counts_reactions(long_run):
    result, _ = long_run
    for s in result["samples"]:
        tasks = [r["task"] for r in s["tasks"]]
        # one pause task per conversation at least, each scored inside the episode
        assert tasks.count("pause_handling") >= s["conversations"], tasks
        for r in s["tasks"]:
            if r["task"] == "pause_handling":
                assert 0 <= r["window"][0] < r["window"][1] <= s["micro_turns"] and r["tor"] in (0.0, 1.0)
                assert "credit" not in r
        react = next(r for r in s["tasks"] if r["task"] == "user_reactions")
        minutes = s["micro_turns"] / 300
        assert react["stopped_per_min"] == pytest.approx(react["stopped"] / minutes)
    agg = result["tasks"]
    assert agg["pause_handling"]["tor_n"] == sum(
        [r["task"] for r in s["tasks"]].count("pause_handling") for s in result["samples"])
    assert agg["user_reactions"]["n"] == 2


def test_the_engine_is_sized_by_the_longest_episode_or_says_which_setting_to_raise(tmp_path):
    cfg = long_cfg(tmp_path, per_scenario=1)
    groups, errors = groups_for(cfg, ["mid_pause"])
    assert not errors and context_needed(groups, cfg.max_output_tokens) > 1024
    small = run(long_cfg(tmp_path, per_scenario=1, max_context=256), quiet=True, model_cfg=CFG, seed=0)
    assert small["samples"] == [] and len(small["errors"]) == 1
    assert "eval.max_context gives 256: raise it" in small["errors"][0]["error"]


def test_long_episodes_need_a_model_and_held_out_scenarios(tmp_path):
    with pytest.raises(SystemExit, match="eval.policy=model or untrained"):
        run(long_cfg(tmp_path, policy="silent"), quiet=True)
    with pytest.raises(SystemExit, match="eval.source=scenarios"):
        run(long_cfg(tmp_path, source="fdb", fdb_dir=str(tmp_path)), quiet=True, model_cfg=CFG)
    with pytest.raises(SystemExit, match="eval.source=scenarios"):
        run(long_cfg(tmp_path, episode_seconds=-1.0), quiet=True, model_cfg=CFG)
