"""Sampler log-probs == trainer ``score`` log-probs, raw bits, for every sampled token.

One scripted run per kernel mode (tests/sampler/scenario.py) is shared by the tests; each
condition asserts bitwise equality in ``batch_invariant`` and shows ``standard``
diverging on the same run. Where standard diverges on this CPU (2-core XLA:CPU, tiny
model, f32): the engine's paged attention in standard mode gathers the session's pages
(4 pages = 256 slots) and runs a dense softmax over all of them, while ``score``'s row is
a dense softmax over its own 256/512-slot row — different reduction shapes, so the
log-probs differ in the last bits (max |Δ| ~1.5e-5 measured); the by-row matmuls of a
batch of 8 chunk rows vs a full row differ as well.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.model.tiny_model import CFG, tiny_model
from tests.sampler.scenario import ENGINE, JOIN, ROLLBACK, inputs_for, run_scenario, sampler_vs_score
from tml import kernels
from tml.model.model import InteractionModel
from tml.sampler import Engine, score
from tml.stream import layout

MODES = [("batch_invariant", True), ("standard", False)]


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def same(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(bits(a), bits(b))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def runs(model):
    return {mode: run_scenario(model, mode) for mode, _ in MODES}


def aligned(run, name, scored_as=None) -> bool:
    a, b = sampler_vs_score(run.outputs[name], run.scored[scored_as or name])
    return same(a, b)


@pytest.mark.parametrize("mode,equal", MODES)
def test_single_session(runs, mode, equal):
    """One session served alone, one prefill call per micro-turn."""
    assert aligned(runs[mode], "alone") == equal


@pytest.mark.parametrize("mode,equal", MODES)
def test_six_concurrent_sessions_of_different_lengths(runs, mode, equal):
    run = runs[mode]
    lengths = {run.lengths[f"s{n}"] for n in JOIN if f"s{n}" in run.lengths}
    assert len(lengths) >= 4  # they really differ
    assert all(aligned(run, f"s{n}") for n in JOIN) == equal
    if equal:  # the committed history is exactly the row the engine fed
        assert all(len(layout(run.turns[f"s{n}"])) == run.lengths[f"s{n}"] for n in JOIN if f"s{n}" in run.lengths)


@pytest.mark.parametrize("mode,equal", MODES)
def test_sixty_four_concurrent_sessions_of_different_lengths(model, mode, equal):
    """64 sessions in one engine, every tick one batch of 64 rows: session i joins at tick
    i % 4 and feeds 2 + i % 3 micro-turns (so the batch holds sessions at different
    depths, some already done and idle), prefill in chunks of 32. Every sampled token's
    log-prob is the bits of ``score`` on the finished session's one row; standard
    diverges (64-row batched matmuls and a paged softmax vs the trainer's row)."""
    n, engine = 64, {**ENGINE, "max_sessions": 64, "batch_buckets": (64,), "max_output_tokens": 6}
    joins = {i: i % 4 for i in range(n)}
    feeds = {i: inputs_for(1000 + i, 2 + i % 3) for i in range(n)}
    with kernels.kernel_mode(mode):
        eng = Engine(model, max_prefill_chunk=32, chunk_buckets=(32,), **engine)
        sids = {}
        for t in range(max(joins.values()) + max(len(f) for f in feeds.values())):
            for i in range(n):
                if joins[i] == t:
                    sids[i] = eng.open(seed=i)
                k = t - joins[i]
                if i in sids and k < len(feeds[i]):
                    eng.append(sids[i], feeds[i][k])
            eng.tick()
        assert len({eng.length(s) for s in sids.values()}) >= 8  # they really differ
        scored = score(model, [eng.turns(sids[i]) for i in range(n)])
        ok = [same(*sampler_vs_score(eng.outputs(sids[i]), scored[i])) for i in range(n)]
    assert all(ok) == equal


@pytest.mark.parametrize("mode,equal", MODES)
def test_sessions_joining_midway_and_leaving(runs, mode, equal):
    """Sessions 1-5 joined at ticks 3-5; session 2 left at tick 6 (scored as it was)."""
    run = runs[mode]
    assert all(aligned(run, f"s{n}") for n in JOIN if JOIN[n] > 0) == equal
    assert aligned(run, "s2") == equal


@pytest.mark.parametrize("mode,equal", MODES)
def test_prefill_chunking(runs, mode, equal):
    """Session 0 prefilled in chunks of 8 (batched with others) vs each micro-turn's
    inputs in one call (alone): same tokens, same log-prob bits, both equal to score."""
    run = runs[mode]
    a = np.concatenate([o.logprobs for o in run.outputs["s0"]])
    b = np.concatenate([o.logprobs for o in run.outputs["alone"]])
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(run.outputs["s0"], run.outputs["alone"]))
    assert same(a, b) == equal  # standard: chunks of 8 in a batch of 8 rows vs one 32-token chunk differ
    assert (aligned(run, "s0") and aligned(run, "alone")) == equal


@pytest.mark.parametrize("mode,equal", MODES)
def test_token_by_token(runs, mode, equal):
    """Inputs prefilled one token per call, outputs decoded one token per call."""
    assert aligned(runs[mode], "by_token") == equal


@pytest.mark.parametrize("mode,equal", MODES)
def test_session_replayed_after_others_ran(runs, mode, equal):
    """Session 0 replayed from its seed in the warm engine, batched with a new session:
    the same tokens (counter-based sampling), log-probs equal to score's bits."""
    run = runs[mode]
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(run.outputs["replay"], run.outputs["s0"]))
    assert aligned(run, "replay", scored_as="s0") == equal


@pytest.mark.parametrize("mode,equal", MODES)
def test_rollback_and_reappend(runs, mode, equal):
    """Session 3 rolled back to micro-turn 1 and re-fed: the redone micro-turns repeat the
    first attempt exactly (seeded), and the final history scores to the same bits."""
    run = runs[mode]
    assert len(run.redone) == len(run.before_rollback) > 0
    for x, y in zip(run.before_rollback, run.redone):
        assert np.array_equal(x.tokens, y.tokens) and same(x.logprobs, y.logprobs)
    assert aligned(run, f"s{ROLLBACK[0]}") == equal


@pytest.mark.parametrize("mode,equal", MODES)
def test_bfloat16_compute(mode, equal):
    """bfloat16 activations (float32 log-softmax): two sessions, 4 micro-turns, on the
    tiny MoE model (a dense layer, then a MoE layer: 4 routed experts top-2 and a shared
    one) — the engine's 32-token prefill chunks run ``kernels.moe_ffn``'s grouped path, its
    decode steps (2 sessions x top-2 = 4 assignments) the GEMV path, and ``score``'s whole
    rows the grouped path over many more tiles. Bitwise because every bf16 value is
    upcast exactly and all MoE arithmetic is float32 at fixed points: gate/up/down in
    canonical chunks, the routing weight on the hidden activation, the slot-order
    combine, one rounding to bf16 at the end (tests/kernels/test_moe.py checks both
    paths against the reference algorithm in bf16). Standard diverges (bf16 rounding of
    differently ordered sums)."""
    cfg = CFG.__class__(**{**CFG.__dict__, "dtype": "bfloat16"})
    assert "moe" in cfg.resolved_mlp_types()
    model = InteractionModel(cfg, rngs=nnx.Rngs(0))
    with kernels.kernel_mode(mode):
        eng = Engine(model, max_sessions=2, batch_buckets=(2,), chunk_buckets=(32,), patch_buckets=(4,),
                     max_output_tokens=8, max_text_bytes=2, max_context=128, vocoder=False)
        assert eng.kv_dtype == jnp.bfloat16
        sids = [eng.open(seed=s) for s in (5, 6)]
        feeds = [inputs_for(s, 4) for s in (5, 6)]
        for t in range(4):
            for sid, f in zip(sids, feeds):
                eng.append(sid, f[t])
            eng.tick()
        scored = score(model, [eng.turns(s) for s in sids])
    ok = [same(*sampler_vs_score(eng.outputs(s), sc)) for s, sc in zip(sids, scored)]
    assert all(ok) == equal
