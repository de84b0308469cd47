"""The engine's contracts besides alignment: compiled programs reused tick after tick,
weights swapped without recompiling, bad input an error to its caller only, the
streaming dMel front end, the output grammar and counter-based sampling."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.model.tiny_model import CFG, tiny_model
from tests.sampler.scenario import ENGINE, inputs_for
from tml.audio import dmel
from tml.bench_report import BACKEND_COMPILE
from tml.model.model import InteractionModel
from tml.sampler import (Engine, OutputGrammar, PoolExhausted, SamplingParams, SessionError, TurnInputs, choose,
                         stream_dmel, uniforms)
from tml.stream import layout
from tml.stream.micro_turns import pad_to_micro_turns
from tml.text import ByteTokenizer

KW = {**ENGINE, "max_prefill_chunk": 8, "chunk_buckets": (8,)}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def test_thirty_ticks_of_growing_sessions_compile_nothing_after_warm_up(model):
    """The first tick compiles the prefill and decode programs, then nothing is compiled:
    the model call's count stays, and no other XLA program is compiled during any tick
    (the frame sum of a speaking micro-turn included: the engine compiles it when built)."""
    eng = Engine(model, **{**KW, "max_context": 1024, "max_output_tokens": 6, "max_text_bytes": 0})
    sids = [eng.open(seed=s) for s in range(3)]
    feeds = [inputs_for(200 + s, 30) for s in range(3)]
    counts, compiled, spoke = [], [], 0
    tick = [0]
    listen = lambda event, secs, **kw: compiled.append((kw.get("fun_name"), tick[0])) if event == BACKEND_COMPILE else None
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for t in range(30):
            tick[0] = t
            for sid, f in zip(sids, feeds):
                eng.append(sid, f[t])
            spoke += any(len(o.speech) for o in eng.tick().values())
            counts.append(eng.compiled_programs())
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert counts[-1] == counts[0], counts  # the first tick compiled prefill + decode, then none
    assert spoke, "seeded run: the sessions speak"
    # only the model call and the inputs' host-to-device staging, and only in the first tick
    assert {f for f, t in compiled} <= {"jit(_advance)", "jit(stage)"} and {t for f, t in compiled} <= {0}, compiled
    assert min(eng.length(s) for s in sids) > 2 * 64  # the sessions grew over several pages
    eng.pool.check()


def test_set_params_swaps_weights_without_recompiling(model):
    eng = Engine(model, **KW)
    sid = eng.open(seed=3)
    feed = inputs_for(3, 3)
    first = [eng.step(sid, f) for f in feed]
    n = eng.compiled_programs()
    other = InteractionModel(CFG, rngs=nnx.Rngs(1))
    eng.set_params(nnx.split(other)[1])
    eng.rollback(sid, 0)
    swapped = [eng.step(sid, f) for f in feed]
    assert not np.array_equal(bits(first[0].logprobs[:1]), bits(swapped[0].logprobs[:1]))
    eng.set_params(model)
    eng.rollback(sid, 0)
    back = [eng.step(sid, f) for f in feed]
    assert all(np.array_equal(bits(a.logprobs), bits(b.logprobs)) for a, b in zip(first, back))
    assert eng.compiled_programs() == n
    with pytest.raises(ValueError, match="same architecture"):
        eng.set_params(nnx.split(InteractionModel(CFG.__class__(**{**CFG.__dict__, "n_layers": 1}),
                                                  rngs=nnx.Rngs(0)))[1])


def test_bad_input_is_an_error_to_its_caller_only(model):
    """Every bad call raises before anything is queued; the good sessions' outputs are
    bit for bit those of a run without the bad calls."""
    def run(with_errors: bool):
        eng = Engine(model, **{**KW, "max_context": 192, "n_pages": 5})
        a, b = eng.open(seed=1), eng.open(seed=2)
        fa, fb = inputs_for(11, 3), inputs_for(12, 3)
        errors = []
        for t in range(3):
            if with_errors:
                c = eng.open(seed=9)
                bad = [
                    (ValueError, "3200 mono samples", lambda: eng.append(a, TurnInputs(audio=np.zeros(3000, np.float32)))),
                    (ValueError, "resample", lambda: eng.append(a, TurnInputs(audio=np.zeros(3200, np.float32), sample_rate=8000))),
                    (ValueError, "non-finite", lambda: eng.append(b, TurnInputs(audio=np.full(3200, np.nan, np.float32)))),
                    (ValueError, r"integer bins \[4, 80\]", lambda: eng.append(b, TurnInputs(dmel=np.zeros((4, 81), np.uint8)))),
                    (ValueError, "frame pair", lambda: eng.append(a, TurnInputs(dmel=fa[t].dmel, video=np.zeros((3, 40, 40, 3), np.uint8)))),
                    (SessionError, "unknown or closed", lambda: eng.append(999, fa[t])),
                    (ValueError, "past its capacity", lambda: eng.append(c, TurnInputs(dmel=fa[t].dmel, typed="x" * 200))),
                    (ValueError, r"roll back to 0\.\.", lambda: eng.rollback(a, t + 1)),
                ]
                for exc, msg, call in bad:
                    with pytest.raises(exc, match=msg):
                        call()
                    errors.append(msg)
                eng.close(c)
                with pytest.raises(SessionError, match="unknown or closed"):
                    eng.append(c, fa[t])
            eng.append(a, fa[t])
            eng.append(b, fb[t])
            if with_errors and t == 2:  # the pool is full now: a new session gets no pages
                c = eng.open(seed=9)
                with pytest.raises(PoolExhausted, match="more n_pages"):
                    eng.append(c, TurnInputs(dmel=fa[t].dmel, typed="y" * 150))
                eng.close(c)
            out = eng.tick()
            assert sorted(out) == [a, b]
        eng.pool.check()
        return [o.logprobs for s in (a, b) for o in eng.outputs(s)], [o.tokens for s in (a, b) for o in eng.outputs(s)]

    clean, noisy = run(False), run(True)
    assert all(np.array_equal(bits(x), bits(y)) for x, y in zip(clean[0], noisy[0]))
    assert all(np.array_equal(x, y) for x, y in zip(clean[1], noisy[1]))


def test_streaming_dmel_equals_the_corpus_front_end():
    """200 ms at a time with the previous hop kept gives the bins tml.audio.dmel computes
    over the whole recording (what the corpus builder stores)."""
    rng = np.random.default_rng(0)
    audio = (0.3 * np.sin(np.arange(16000) * 0.05) + 0.05 * rng.normal(size=16000)).astype(np.float32)
    whole = dmel(pad_to_micro_turns(audio))
    tail, parts = np.zeros(800, np.float32), []
    for t in range(5):
        bins, tail = stream_dmel(tail, audio[3200 * t:3200 * (t + 1)])
        parts.append(bins)
    assert np.array_equal(np.concatenate(parts), whole)


def test_audio_in_speech_and_waveform_out(model):
    eng = Engine(model, **{**KW, "vocoder": True, "max_text_bytes": 0})
    sid = eng.open(seed=4, context="be brief")
    rng = np.random.default_rng(1)
    outs = [eng.step(sid, TurnInputs(audio=(0.1 * rng.normal(size=3200)).astype(np.float32))) for _ in range(4)]
    assert eng.turns(sid)[0].typed == "be brief"
    spoke = [o for o in outs if len(o.speech)]
    assert spoke, "seeded run: the model speaks in some micro-turn"
    for o in outs:
        assert o.speech.shape in ((0, 80), (4, 80)) and o.waveform.shape == (800 * len(o.speech),)
        assert o.speech_channel_logprobs.shape == (len(o.speech), 80)
    assert len(layout(eng.turns(sid))) == eng.length(sid)


def test_grammar_keeps_utf8_and_the_budget():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    for trial in range(200):
        budget = int(rng.integers(2, 12))
        g = OutputGrammar(tok, budget)
        out = []
        while g.phase != "done":
            if g.phase == "speech":
                tokn = tok.control_id("<speech>")
            else:
                allowed = np.flatnonzero(g.allowed())
                tokn = int(rng.choice(allowed))
            g.advance(tokn)
            out.append(tokn)
        assert len(out) <= budget and out[-1] == tok.control_id("<end>")
        text = bytes(t for t in out if t < 256)
        text.decode("utf-8")  # strict: raises on invalid UTF-8
    with pytest.raises(ValueError, match="at least 2"):
        OutputGrammar(tok, 1)


def test_sampling_is_counter_based_and_filters_as_documented():
    u1, u2 = uniforms(7, 3, 40, 0, (269,)), uniforms(7, 3, 40, 0, (269,))
    assert np.array_equal(u1, u2)
    assert not np.array_equal(u1, uniforms(7, 3, 41, 0, (269,)))
    assert not np.array_equal(u1, uniforms(7, 3, 40, 1, (269,)))
    assert not np.array_equal(u1, uniforms(8, 3, 40, 0, (269,)))
    logp = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = lambda p: {int(choose(logp, p, uniforms(1, 0, i, 0, (4,)))) for i in range(300)}
    assert draws(SamplingParams(temperature=0)) == {0}
    assert draws(SamplingParams(top_k=2)) == {0, 1}
    assert draws(SamplingParams(top_p=0.7)) == {0, 1}
    assert draws(SamplingParams(min_p=0.35)) == {0, 1}
    assert draws(SamplingParams()) == {0, 1, 2, 3}
    assert int(choose(logp, SamplingParams(), uniforms(1, 0, 0, 0, (4,)), np.array([0, 0, 1, 0], bool))) == 2
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validate()
