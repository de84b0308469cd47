"""``tml rl``'s loop on the tiny test model: drift metrics exactly aligned at every step
in ``batch_invariant`` (and not in ``standard``), weight pushes without recompiling,
metrics.jsonl, bitwise resume of the whole RL state."""

import dataclasses
import types

import jax
import numpy as np
import pytest

from tests.model.tiny_model import CFG
from tml.rl.config import RLConfig
from tml.rl.loop import run
from tml.sampler.divergence import ALIGNED, METRICS
from tml.train.metrics_log import read_metrics

RECIPE = RLConfig(init_checkpoint="none", steps=2, scenarios=["turn_taking", "background_speech"], group_size=2,
                  max_micro_turns=32, max_output_tokens=8, max_context=1024, lr=3e-3,
                  rewards={"turn_taking_tor": 1.0, "turn_taking_latency": 1.0, "background_tor": 1.0})


def rl(tmp, name, **kw):
    c = dataclasses.replace(RECIPE, run_dir=str(tmp / name), **kw)
    return run(types.SimpleNamespace(model=CFG, rl=c)), tmp / name


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    return rl(tmp_path_factory.mktemp("rl"), "bi")


def params_of(run_dir, step):
    from tml.eval.checkpoint import load_model
    from flax import nnx

    model, _ = load_model(CFG, str(run_dir / "checkpoints" / str(step)))
    return jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))


def test_batch_invariant_drift_is_exactly_aligned_every_step(aligned):
    records, run_dir = aligned
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {k: r[k] for k in METRICS} == ALIGNED  # 1.0, 0, 0, 0, 1, 1, 1, 1 exactly
        assert r["rl/ratio_mean"] == 1.0 and r["tokens"] > 0 and r["episodes"] == 4
    assert [{k: r[k] for k in METRICS} for r in read_metrics(run_dir)] == [ALIGNED, ALIGNED]


def test_weights_move_and_the_push_compiles_nothing(aligned):
    records, run_dir = aligned
    assert any(r["rl/grad_norm"] > 0 for r in records)
    for r in records:
        assert r["engine/compiled_programs_after_push"] == r["engine/compiled_programs"]
        assert r["time/push_s"] >= 0
    assert records[0]["engine/compiled_programs"] == records[1]["engine/compiled_programs"]
    after = params_of(run_dir, 2)
    from tml.eval.checkpoint import load_model
    from flax import nnx

    init = jax.tree_util.tree_leaves(nnx.state(load_model(CFG, None, 0)[0], nnx.Param))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(init, after))


def test_resume_is_bitwise(aligned, tmp_path):
    """One step, stop, resume for the second: the same metrics and the same weight bits as
    two steps in one go (scenario counters restored, episode seeds from the step's inputs)."""
    records, run_dir = aligned
    first, split = rl(tmp_path, "split", steps=1)
    second, _ = rl(tmp_path, "split", steps=2)
    assert [r["step"] for r in first + second] == [1, 2]
    drop = ("time", "engine/", "mem/")  # wall times; the compile counter is per process, shared by engines; RSS
    for a, b in zip(records, first + second):
        a = {k: v for k, v in a.items() if not k.startswith(drop)}
        b = {k: v for k, v in b.items() if not k.startswith(drop)}
        assert a == b
    for a, b in zip(params_of(run_dir, 2), params_of(split, 2)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_standard_kernels_show_the_drift(tmp_path):
    records, _ = rl(tmp_path, "std", steps=1, kernel_mode="standard")
    r = records[0]
    assert r["mismatch/bitwise_equal_fraction"] < 1.0
    assert r["mismatch/logprob_abs_diff_max"] > 0 and r["mismatch/kl_k3"] > 0


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rl.group_size must be >= 2"):
        rl(tmp_path, "bad", group_size=1)
    with pytest.raises(ValueError, match="unknown reward names"):
        rl(tmp_path, "bad2", rewards={"tor": 1.0})


def test_after_a_push_the_engine_samples_the_bits_of_a_fresh_engine(aligned):
    """An engine that served the initial weights and got the step-2 weights by set_params
    plays a group with the same tokens and log-prob bits as an engine built on them."""
    from flax import nnx

    from tml import kernels
    from tml.eval.checkpoint import load_model
    from tml.rl.episodes import step_groups
    from tml.rl.loop import canonical
    from tml.rl.rollout import make_engine, play

    _, run_dir = aligned
    # as the loop holds them (a restored state's committed arrays would compile anew)
    init = nnx.merge(*(lambda g, s: (g, canonical(s)))(*nnx.split(load_model(CFG, None, 0)[0])))
    trained = nnx.merge(*(lambda g, s: (g, canonical(s)))(*nnx.split(load_model(CFG, str(run_dir / "checkpoints" / "2"))[0])))
    groups, _, _ = step_groups(["turn_taking"], 0, {}, 2, 24)
    kw = dict(max_context=1024, temperature=1.0, top_p=1.0, max_output_tokens=8)
    with kernels.kernel_mode("batch_invariant"):
        pushed = make_engine(init, 4, **kw)
        play(pushed, groups, RECIPE.rewards)            # serve the old weights first
        compiled = pushed.compiled_programs()
        pushed.set_params(nnx.split(trained)[1])
        a, _ = play(pushed, groups, RECIPE.rewards)
        assert pushed.compiled_programs() == compiled
        b, _ = play(make_engine(trained, 4, **kw), groups, RECIPE.rewards)
    for x, y in zip(a, b):
        lx = np.concatenate([o.logprobs for o in x.outputs])
        ly = np.concatenate([o.logprobs for o in y.outputs])
        assert np.array_equal(np.concatenate([o.tokens for o in x.outputs]), np.concatenate([o.tokens for o in y.outputs]))
        assert np.array_equal(lx.view(np.uint32), ly.view(np.uint32))


def test_sigterm_saves_the_finished_step_first(aligned, tmp_path, monkeypatch):
    """SIGTERM during step 1's rollout: step 1 finishes, is checkpointed, and the run exits 0."""
    import os
    import signal

    import tml.rl.loop as loop

    real = loop.play

    def play_then_term(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(loop, "play", play_then_term)
    with pytest.raises(SystemExit) as e:
        rl(tmp_path, "term", steps=2)
    assert e.value.code == 0
    from tml.train.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "term" / "checkpoints", model_config=CFG, async_save=False)
    assert ck.all_steps() == [1]
    ck.close()
    assert [r["step"] for r in read_metrics(tmp_path / "term")] == [1]


def test_reacting_user_and_micro_turn_credit_step_is_exactly_aligned(tmp_path):
    """The long-episode path (tml.rl.user: a reacting user per episode, scored on its own
    realised reference) with per-micro-turn credit, one step on the test recipe's shapes
    (one conversation per episode, so the engine and update programs are the ones above)."""
    records, _ = rl(tmp_path, "react", steps=1, episode_seconds=8.0, credit="micro_turn", credit_radius=2,
                    user_repeat_after_s=0.0)  # repeats (tests/rl/test_user.py) would need more than 1024 KV slots
    (r,) = records
    assert {k: r[k] for k in METRICS} == ALIGNED
    assert r["rl/ratio_min"] == r["rl/ratio_max"] == 1.0 and r["rl/grad_norm"] > 0
    assert r["episodes"] == 4 and r["episode/seconds_mean"] >= 8.0
    assert r["user/stopped"] >= 0 and r["user/repeated"] >= 0
    with pytest.raises(ValueError, match="rl.credit"):
        rl(tmp_path, "bad3", credit="token")


def test_micro_batched_learner_on_fixed_rows_is_the_full_batch_update(aligned, tmp_path):
    """rl.learn_rows=1 (gradients summed row by row) on rows of rl.row_tokens (one compiled
    shape for the run): the same episodes and drift, exactly aligned and ratio 1, and the
    update's loss / gradient norm / entropy those of the full-batch step (up to float
    rounding of the summation order); an episode longer than the rows is dropped, named."""
    records, _ = aligned
    (r,), _ = rl(tmp_path, "mb", steps=1, learn_rows=1, row_tokens=1024)
    full = records[0]
    assert {k: r[k] for k in METRICS} == ALIGNED and r["rl/ratio_min"] == r["rl/ratio_max"] == 1.0
    assert r["reward/mean"] == full["reward/mean"] and r["tokens"] == full["tokens"]
    for k in ("rl/pg_loss", "rl/grad_norm", "rl/entropy", "rl/ratio_mean"):
        np.testing.assert_allclose(r[k], full[k], rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"every episode was dropped.*rl.row_tokens gives 64"):
        rl(tmp_path, "short", steps=1, row_tokens=64)
    with pytest.raises(ValueError, match="rl.row_tokens must be 0 or a positive multiple"):
        rl(tmp_path, "bad4", row_tokens=100)


def test_speech_weight_zero_learns_when_to_speak_not_the_audio(tmp_path):
    """rl.speech_weight=0: speech frames carry no policy gradient, so (no KL) the speech
    head's gradient is exactly 0 while the text head's is not; with the default weight 1
    both move, and the text head's gradient does not depend on the weight (the speech
    frames' log-probs do not reach it)."""
    from flax import nnx

    from tests.stream.random_turns import random_turns
    from tml.eval.checkpoint import load_model
    from tml.model.loss import next_token_targets, token_logprobs
    from tml.rl.learner import _make_update, optimizer_for
    from tml.sampler.score import pad_rows
    from tml.stream import layout

    rng = np.random.default_rng(0)
    batch = {k: jax.numpy.asarray(v) for k, v in pad_rows([layout(random_turns(rng, 6, video_every=0))
                                                           for _ in range(2)]).items()}
    t = next_token_targets(batch)
    mask = np.asarray(t["text"] | t["speech"] | t["control"], np.float32)
    assert np.asarray(t["speech"]).sum() > 0 and np.asarray(t["text"]).sum() > 0
    weight = mask / mask.sum()
    adv = rng.standard_normal(mask.shape).astype(np.float32)
    zeros = np.zeros_like(mask)
    model = load_model(CFG, None, 0)[0]
    lp = token_logprobs(model(batch), batch)
    old = np.where(lp["speech_mask"], np.asarray(lp["speech"]).sum(-1), lp["token"]).astype(np.float32)  # ratio ~1
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads(w):
        c = dataclasses.replace(RECIPE, speech_weight=w)
        g, _ = _make_update(graphdef, c, optimizer_for(c)).grad(params, rest, batch, mask, weight, zeros, old,
                                                                zeros, adv)
        flat = jax.tree_util.tree_flatten_with_path(g)[0]
        pick = lambda name: [np.asarray(x) for p, x in flat if name in jax.tree_util.keystr(p)]
        return pick("speech_head"), pick("text_head")

    sp0, tx0 = grads(0.0)
    sp1, tx1 = grads(1.0)
    assert sp0 and all(not x.any() for x in sp0) and any(x.any() for x in tx0)
    assert any(x.any() for x in sp1)
    assert all(np.array_equal(a, b) for a, b in zip(tx0, tx1))
    with pytest.raises(ValueError, match="rl.speech_weight"):
        rl(tmp_path, "bad", speech_weight=-1.0)
