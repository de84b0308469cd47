"""The synthetic interaction corpus and its built-in speech synthesiser.

Each scenario test checks the fact the scenario teaches against the arrays themselves
(model audio energy, word times, video frames), so a generator that broke the timing
would fail here, not only a generator that crashed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tml.data_pipelines import synth_speech as ss
from tml.data_pipelines.scenarios import (
    MAX_SECONDS,
    META_KEYS,
    MIN_SECONDS,
    SCENARIOS,
    VIDEO_SIZE,
    count_repetitions,
    make_conversation,
    make_corpus,
)

from tml.stream.conversation import SAMPLE_RATE, VIDEO_FPS, Conversation

SR = SAMPLE_RATE
INDICES = (0, 1, 2, 3)   # conversations per scenario checked below
EDGE = 0.02              # tolerance at span edges (s): the resonators ring ~15 ms after a word


@pytest.fixture(scope="module")
def convs() -> dict[str, list[Conversation]]:
    return {sc: [make_conversation(sc, 11, i) for i in INDICES] for sc in SCENARIOS}


def _peak(audio: np.ndarray, t0: float, t1: float) -> float:
    seg = audio[max(0, int(round(t0 * SR))): max(0, int(round(t1 * SR)))]
    return float(np.abs(seg).max()) if len(seg) else 0.0


def _rms(audio: np.ndarray, t0: float, t1: float) -> float:
    seg = audio[max(0, int(round(t0 * SR))): max(0, int(round(t1 * SR)))].astype(np.float64)
    return float(np.sqrt(np.mean(seg * seg))) if len(seg) else 0.0


def _words(conv: Conversation, speaker: str):
    return [w for w in conv.words if w.speaker == speaker]


def _model_words_in(conv: Conversation, t0: float, t1: float):
    return [w for w in _words(conv, "model") if w.start < t1 and w.end > t0]


# ------------------------------------------------------------------------ synthesiser


def test_synthesiser_is_deterministic_and_seed_dependent():
    v = ss.Voice.from_seed(5)
    a = ss.synthesize("hello there, how are you today?", v, 3)
    b = ss.synthesize("hello there, how are you today?", v, 3)
    c = ss.synthesize("hello there, how are you today?", v, 4)
    d = ss.synthesize("hello there, how are you today?", ss.Voice.from_seed(6), 3)
    assert a.audio.dtype == np.float32 and a.audio.ndim == 1
    assert np.array_equal(a.audio.view(np.uint32), b.audio.view(np.uint32)) and a.words == b.words
    assert not np.array_equal(a.audio[: min(len(a.audio), len(c.audio))], c.audio[: min(len(a.audio), len(c.audio))])
    assert not np.array_equal(a.audio[: min(len(a.audio), len(d.audio))], d.audio[: min(len(a.audio), len(d.audio))])
    assert [w for w, _, _ in a.words] == ["hello", "there", "how", "are", "you", "today"]
    assert np.isfinite(a.audio).all() and abs(float(np.abs(a.audio).max()) - 0.5) < 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_word_times_match_energy(seed):
    """Inside every word there is sound; away from all words there is (almost) none."""
    voice = ss.Voice.from_seed(100 + seed)
    text = ["she sells sea shells, by the shore.", "can you tell me what time it is?",
            "i went to the market, and they had fresh strawberries.",
            "stop, wait five seconds, then go."][seed]
    sp = ss.synthesize(text, voice, seed)
    a = sp.audio
    peak = float(np.abs(a).max())
    frame = 160  # 10 ms
    env = np.sqrt(np.mean(a[: len(a) // frame * frame].reshape(-1, frame).astype(np.float64) ** 2, 1))
    covered = np.zeros(len(a), bool)
    prev_end = 0.0
    for w, t0, t1 in sp.words:
        assert t0 >= prev_end - 1e-9 and t1 > t0, "words are ordered and do not overlap"
        prev_end = t1
        f0, f1 = int(t0 * SR) // frame, int(math.ceil(t1 * SR / frame))
        active = env[f0:f1] > 0.02 * peak
        assert active.mean() >= 0.5, f"word {w!r} [{t0:.3f}, {t1:.3f}] is mostly silent"
        covered[int(t0 * SR): int((t1 + EDGE) * SR)] = True
    assert (~covered).sum() > 0.1 * SR, "the test needs pauses to look at"
    assert float(np.abs(a[~covered]).max()) < 0.01 * peak, "sound outside the word times"
    assert sp.duration == pytest.approx(sp.words[-1][2] + 0.06, abs=1e-3)


def test_prosody_and_voices_differ():
    """Question rises end higher than statements; voices from seeds differ in pitch."""
    v = ss.Voice(f0=120.0, pitch_range=0.3)

    def final_pitch(sp):  # autocorrelation pitch of the last 120 ms of the last word
        t1 = sp.words[-1][2]
        x = sp.audio[int((t1 - 0.12) * SR): int(t1 * SR)].astype(np.float64)
        x = x - x.mean()
        ac = np.correlate(x, x, "full")[len(x) - 1:]
        lo, hi = SR // 400, SR // 60
        return SR / (lo + int(np.argmax(ac[lo:hi])))

    rise = ss.synthesize("is it raining", v, 1, intonation="rise")
    fall = ss.synthesize("is it raining", v, 1, intonation="fall")
    assert final_pitch(rise) > 1.2 * final_pitch(fall)
    f0s = {round(ss.Voice.from_seed(s).f0) for s in range(10)}
    assert len(f0s) >= 8 and min(f0s) < 150 < max(f0s)


def test_phonemize_and_numbers():
    assert ss.number_words(0) == "zero" and ss.number_words(21) == "twenty one"
    assert ss.number_words(380) == "three hundred eighty"
    assert [p for p, _ in ss.phonemize("she")][0] == "sh"
    assert [p for p, _ in ss.phonemize("7")] == [p for p, _ in ss.phonemize("seven")]
    assert all(d > 0 for _, d in ss.phonemize("strawberries"))
    with pytest.raises(ValueError):
        ss.synthesize(",.", ss.Voice(), 0)


def test_espeak_backend_is_optional():
    if ss.espeak_available():
        sp = ss.synthesize("hello world", ss.Voice(), 0, backend="espeak")
        assert len(sp.words) == 2 and sp.audio.dtype == np.float32
    else:
        with pytest.raises(RuntimeError):
            ss.synthesize("hello world", ss.Voice(), 0, backend="espeak")


def test_throughput_is_measured():
    """Speed is reported (run with -s to see it), not asserted: machines differ."""
    r = ss.benchmark(seconds=0.3)
    print(f"\nsynthesis: {r['realtime_factor']:.0f} s of audio per s (wall), "
          f"{r['cpu_realtime_factor']:.0f} per CPU-s")
    assert r["audio_seconds"] > 0 and r["realtime_factor"] > 0


# ------------------------------------------------------------------------ corpus-wide


def test_every_scenario_is_valid(convs):
    for sc, cs in convs.items():
        for c in cs:
            c.validate()
            assert c.scenario == sc and c.id.startswith(f"synth-{sc}-")
            assert MIN_SECONDS - 1e-9 <= c.duration <= MAX_SECONDS
            assert len(c.user_audio) == len(c.model_audio)
            for a in (c.user_audio, c.model_audio):
                assert a.dtype == np.float32 and np.isfinite(a).all()
                assert float(np.abs(a).max()) <= 0.9
            assert _words(c, "user") or any(e.kind == "typed" for e in c.events)
            assert _words(c, "model"), "every scenario has a speech target"
            assert [w.start for w in c.words] == sorted(w.start for w in c.words)
            assert [e.time for e in c.events] == sorted(e.time for e in c.events)
            for key in ("utterances", "model_speech", "must_stay_silent", *META_KEYS[sc]):
                assert key in c.meta, f"{sc}: meta lacks {key}"
            json.dumps(c.meta)  # JSON-ready
            assert (c.video is not None) == (sc == "rep_count")


def test_model_text_is_the_transcript(convs):
    for cs in convs.values():
        for c in cs:
            texts = [e for e in c.events if e.kind == "model_text"]
            assert "".join(e.text for e in texts) == "".join(w.text + " " for w in _words(c, "model"))
            for e in texts:  # each event sits in the micro-turn of its words
                first = next(w for w in _words(c, "model") if w.start >= e.time - 1e-9)
                assert first.start == pytest.approx(e.time)


def test_model_is_silent_where_it_must_be(convs):
    for cs in convs.values():
        for c in cs:
            for t0, t1 in c.meta["must_stay_silent"]:
                assert not _model_words_in(c, t0, t1), f"{c.id}: model words in [{t0:.2f}, {t1:.2f}]"
                assert _peak(c.model_audio, t0 + EDGE, t1) < 5e-3, f"{c.id}: model audio in silent span"
            # the model channel has sound only around its words
            mask = np.zeros(len(c.model_audio), bool)
            for w in _words(c, "model"):
                mask[int(w.start * SR): int((w.end + EDGE) * SR)] = True
            assert float(np.abs(c.model_audio[~mask]).max(initial=0.0)) < 5e-3, c.id


def test_determinism(convs):
    for sc in SCENARIOS:
        a = convs[sc][1]
        b = make_conversation(sc, 11, INDICES[1])
        for x, y in ((a.user_audio, b.user_audio), (a.model_audio, b.model_audio)):
            assert np.array_equal(x.view(np.uint32), y.view(np.uint32))
        assert a.words == b.words and a.events == b.events and a.meta == b.meta
        if a.video is not None:
            assert np.array_equal(a.video, b.video)
        c = make_conversation(sc, 12, INDICES[1])
        n = min(len(a.user_audio), len(c.user_audio))
        assert not np.array_equal(a.user_audio[:n], c.user_audio[:n]), f"{sc}: seed ignored"
        d = make_conversation(sc, 11, INDICES[2])
        assert d.id != a.id


def test_make_corpus_cycles_scenarios():
    first = list(make_corpus(len(SCENARIOS) + 2, seed=4))
    assert [c.scenario for c in first] == list(SCENARIOS) + list(SCENARIOS[:2])
    again = make_conversation(SCENARIOS[1], 4, 1)
    assert np.array_equal(first[1].user_audio, again.user_audio)
    assert len({c.id for c in first}) == len(first)
    with pytest.raises(ValueError):
        make_conversation("nope", 0, 0)


def test_user_channel_levels(convs):
    """Background speech is quieter than the user, and the model channel is separate."""
    for c in convs["background_speech"]:
        other = [[a, b] for a, b in c.meta["other_spans"]]
        users = [[u[1], u[2]] for u in c.meta["utterances"] if u[0] == "user"]
        alone = [o for o in other if all(b <= o[0] or a >= o[1] for a, b in users)]
        assert alone, "some background speech happens while the user is silent"
        o_rms = max(_rms(c.user_audio, a, b) for a, b in alone)
        u_rms = max(_rms(c.user_audio, a, b) for a, b in users)
        assert o_rms < 0.7 * u_rms
        assert o_rms > 5 * _rms(c.user_audio, c.duration - 0.2, c.duration)  # above the floor
        for a, b in other:
            assert _peak(c.model_audio, a, b) < 1e-3


# ------------------------------------------------------------------------ per scenario


def test_turn_taking(convs):
    for c in convs["turn_taking"]:
        gaps = c.meta["response_gaps"]
        assert len(gaps) >= 2 and all(0.15 <= g <= 1.0 for g in gaps)
        for end, gap in zip(c.meta["turn_ends"], gaps):
            after = [w for w in _words(c, "model") if w.start >= end - 1e-9]
            assert after and after[0].start == pytest.approx(end + gap, abs=2e-3)
            assert _peak(c.model_audio, end - 0.3, end) == 0.0  # silent while the user ends
    spread = [g for c in convs["turn_taking"] for g in c.meta["response_gaps"]]
    assert max(spread) - min(spread) > 0.3, "pauses of varied length"


def test_mid_pause(convs):
    for c in convs["mid_pause"]:
        p0, p1 = c.meta["pause"]
        assert 0.6 - 1e-3 <= p1 - p0 <= 1.2 + 1e-3
        user = _words(c, "user")
        assert any(abs(w.end - p0) < 1e-6 for w in user) and any(abs(w.start - p1) < 1e-6 for w in user)
        assert not any(w.start < p1 and w.end > p0 for w in user), "the pause is silent"
        assert not _model_words_in(c, p0, p1)
        assert _peak(c.model_audio, p0, p1) == 0.0, "the model does not take the turn in the pause"
        end = c.meta["turn_end"]
        assert end > p1
        start = c.meta["response_start"]
        assert end < start <= end + 0.65
        assert _rms(c.model_audio, start, start + 0.3) > 0.01, "the model answers after the real end"


def test_backchannel(convs):
    for c in convs["backchannel"]:
        events = [e for e in c.events if e.kind == "backchannel"]
        assert events and len(events) == len(c.meta["backchannels"])
        for e, (t0, t1, word) in zip(events, c.meta["backchannels"]):
            assert e.time == pytest.approx(t0)
            said = _model_words_in(c, t0, t1)
            assert said and " ".join(w.text for w in said) == word
            assert t1 - t0 < 0.8, "a backchannel is short"
            assert _rms(c.model_audio, t0, t1) > 0.005
            assert not [w for w in _words(c, "user") if w.start < t1 and w.end > t0]
            # the user keeps the turn: more user speech follows before the model answers
            assert any(w.start > t1 for w in _words(c, "user"))
            assert t1 < c.meta["turn_end"]
        assert c.meta["response_start"] > c.meta["turn_end"]


def test_interruption(convs):
    for c in convs["interruption"]:
        ti, stop = c.meta["interrupt_time"], c.meta["model_stop_time"]
        assert 0.0 < stop - ti <= 0.25, "stops within ~1 micro-turn"
        assert abs(stop / 0.2 - round(stop / 0.2)) < 1e-6, "stops at a micro-turn boundary"
        assert _rms(c.model_audio, ti - 0.4, ti) > 0.01, "the model was speaking"
        assert any(w.start == pytest.approx(ti) for w in _words(c, "user"))
        end = c.meta["turn_end"]
        assert _peak(c.model_audio, stop, end) == 0.0, "the model yields"
        assert all(w.end <= stop + 1e-9 for w in _model_words_in(c, 0.0, end))
        assert c.meta["cut_text"], "the rest of the answer is left unsaid"
        assert c.meta["response_start"] > end


def test_cue_speak(convs):
    for c in convs["cue_speak"]:
        cue, resp = c.meta["cue_word"], c.meta["cue_response"]
        user_text = [w.text for w in _words(c, "user")]
        k = user_text.index(cue)
        assert user_text[k - 2: k] == ["i", "say"] and resp in user_text[k:k + 4], "agreed earlier"
        assert c.meta["cues"] and len(c.meta["cues"]) == len(c.meta["responses"])
        for (c0, c1), (r0, r1) in zip(c.meta["cues"], c.meta["responses"]):
            assert any(w.text == cue and w.start == pytest.approx(c0) for w in _words(c, "user"))
            assert 0.0 <= r0 - c1 <= 0.4, "responds within 2 micro-turns of the cue's end"
            said = _model_words_in(c, r0, r1)
            assert [w.text for w in said] == [resp]
            assert _rms(c.model_audio, r0, r1) > 0.01
        # after the agreement, the model speaks only right after a cue, never after a distractor
        ack_end = c.meta["model_speech"][0][1]
        later = [w for w in _words(c, "model") if w.start > ack_end]
        assert later and all(any(0.0 <= w.start - c1 <= 0.4 for _, c1 in c.meta["cues"]) for w in later)
        distractors = [w for w in _words(c, "user")[k + 4:] if w.end < c.meta["cues"][0][0]
                       and w.text not in (cue, "okay", "listen", "here", "we", "go", "ready", "let", "us", "start")]
        assert distractors, "the cue comes after other words of its kind"


def test_time_speak(convs):
    for c in convs["time_speak"]:
        d, end, target = c.meta["delay_seconds"], c.meta["request_end"], c.meta["target_time"]
        assert target == pytest.approx(end + d)
        spoken = " ".join(w.text for w in _words(c, "user"))
        assert f" {ss.number_words(d)} seconds" in f" {spoken}"
        word = c.meta["target_word"]
        said = [w for w in _words(c, "model") if w.text == word and w.start > end + 1.0]
        assert said and abs(said[0].start - target) <= 0.2, "speaks at the stated time"
        assert _rms(c.model_audio, said[0].start, said[0].end) > 0.01
        # before that, at most a short acknowledgement right after the request
        early = _model_words_in(c, end, target - 0.2)
        assert not early or (early[0].start < end + 0.5 and early[-1].end < end + 1.5), "waits"


def test_background_speech(convs):
    for c in convs["background_speech"]:
        other = _words(c, "other")
        assert other and c.meta["other_spans"]
        for w in other:
            assert not _model_words_in(c, w.start, w.end + 0.5), "no answer to background speech"
            assert _peak(c.model_audio, w.start, w.end) < 1e-3
        assert c.meta["other_level_db"] < -6


def _count_cycles_independently(video: np.ndarray) -> int:
    """Extrema of the object's position along its direction of travel, from raw frames."""
    diff = np.abs(video.astype(np.int16) - video[:, :1, :1].astype(np.int16)).sum(-1) > 40
    pos = []
    for f in diff:
        yy, xx = np.nonzero(f)
        pos.append((yy.mean(), xx.mean()))
    pos = np.array(pos)
    axis = int(np.argmax(pos.max(0) - pos.min(0)))
    p = pos[:, axis] - pos[0, axis]
    far = np.abs(p) > 0.5 * np.abs(p).max()
    return int(np.sum(far[1:] & ~far[:-1]))  # entries into the far half


def test_rep_count(convs):
    counts = set()
    for c in convs["rep_count"]:
        v, n = c.video, c.meta["expected_count"]
        assert v.dtype == np.uint8 and v.shape[1:] == (*VIDEO_SIZE, 3)
        assert len(v) == math.ceil(len(c.user_audio) / (SR // VIDEO_FPS))
        assert _count_cycles_independently(v) == n
        assert count_repetitions(v) == n
        m0, m1 = c.meta["motion"]
        f0, f1 = int(m0 * VIDEO_FPS), int(math.ceil(m1 * VIDEO_FPS))
        assert np.array_equal(v[0], v[max(0, f0 - 1)]), "at rest before the motion"
        assert np.array_equal(v[min(len(v) - 1, f1 + 1)], v[-1]), "at rest after it"
        assert c.meta["answer_start"] > m1
        answer = " ".join(w.text for w in _words(c, "model") if w.start >= m1)
        assert ss.number_words(n) in answer
        assert not _model_words_in(c, m0, m1), "silent while watching"
        counts.add(n)
    # and counting can fail: a video with one repetition cut off counts one less
    c = convs["rep_count"][0]
    m0, period = c.meta["motion"][0], c.meta["period"]
    cut = int(math.floor((m0 + (c.meta["expected_count"] - 1) * period) * VIDEO_FPS))
    assert _count_cycles_independently(c.video[:cut]) == c.meta["expected_count"] - 1


def test_rep_count_covers_many_counts():
    counts = {make_conversation("rep_count", 3, i).meta["expected_count"] for i in range(12)}
    assert len(counts) >= 4 and counts <= set(range(2, 9))


def test_typed_text(convs):
    for c in convs["typed_text"]:
        typed = [e for e in c.events if e.kind == "typed"]
        assert len(typed) == 1 and typed[0].text == c.meta["typed_text"]
        start = c.meta["response_start"]
        assert typed[0].time < start <= typed[0].time + 1.0
        assert not _model_words_in(c, 0.0, typed[0].time)
        answer = " ".join(w.text for w in _words(c, "model"))
        assert c.meta["expected_answer"] in answer


def test_delegate(convs):
    for c in convs["delegate"]:
        dele = [e for e in c.events if e.kind == "delegate"]
        bg = [e for e in c.events if e.kind == "background"]
        assert len(dele) == 1 and len(bg) == 1
        assert dele[0].text == c.meta["delegate_request"]
        assert dele[0].time < bg[0].time == pytest.approx(c.meta["result_time"])
        assert _model_words_in(c, dele[0].time, dele[0].time + 0.2), "delegates while acknowledging"
        assert not _model_words_in(c, dele[0].time + 2.0, bg[0].time)
        answer = [w for w in _words(c, "model") if w.start > bg[0].time]
        city = c.meta["delegate_request"].split()[-1]
        assert answer and city in [w.text for w in answer]
        assert c.meta["answer_start"] == pytest.approx(answer[0].start)


def test_too_long_conversations_are_redrawn(monkeypatch):
    """A draw over MAX_SECONDS is replaced by a deterministic redraw, never emitted."""
    from tml.data_pipelines import scenarios

    normal = [make_conversation("typed_text", 0, i).duration for i in range(8)]
    monkeypatch.setattr(scenarios, "MAX_SECONDS", 4.5)
    short = [make_conversation("typed_text", 0, i).duration for i in range(8)]
    assert max(normal) > 4.5, "the test needs a draw that is too long"
    assert all(d <= 4.5 for d in short)
    assert short == [make_conversation("typed_text", 0, i).duration for i in range(8)]
    monkeypatch.setattr(scenarios, "MAX_SECONDS", 1.0)
    with pytest.raises(RuntimeError):
        make_conversation("typed_text", 0, 0)
