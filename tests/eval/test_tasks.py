"""TimeSpeak, CueSpeak and RepCount-style scorers: tolerance and deadline bounds, content, metrics."""

from __future__ import annotations

import pytest

from tml.eval import (
    Annotations,
    Cue,
    RepetitionCount,
    SpeakRequest,
    Timeline,
    Word,
    aggregate,
    content_matches,
    cue_speak,
    rep_count,
    spoken_numbers,
    time_speak,
)
from tml.eval.tasks import CUESPEAK_DEADLINE_S, TIMESPEAK_TOLERANCE_S


def tl_with(words, n=50, **ann):
    return Timeline("task", [0] * n, model_words=[Word(*w) for w in words], annotations=Annotations(**ann))


def said(*texts, start=0.0, step=0.2):
    return [(t, start + i * step, start + (i + 1) * step) for i, t in enumerate(texts)]


REQ = (SpeakRequest(4.0, "the time is up"),)


@pytest.mark.parametrize(
    "onset,on_time",
    [(4.0, True), (3.8, True), (4.2, True), (4.0 - TIMESPEAK_TOLERANCE_S, True), (4.0 + TIMESPEAK_TOLERANCE_S, True),
     (4.6, False)],
)
def test_time_speak_tolerance(onset, on_time):
    r = time_speak(tl_with(said("the", "time", "is", "up", start=onset), speak_requests=REQ))
    assert r["requests"][0]["on_time"] is on_time
    assert r["accuracy"] == (1.0 if on_time else 0.0)
    assert r["timing_error"] == pytest.approx(abs(onset - 4.0))


def test_time_speak_speech_before_the_window_is_not_an_attempt():
    words = said("hello", start=1.0) + said("the", "time", "is", "up", start=4.0)
    r = time_speak(tl_with(words, speak_requests=REQ))
    assert r["requests"][0]["onset"] == 4.0 and r["accuracy"] == 1.0
    # too early: the whole attempt lies before time - tolerance -> no attempt at all
    r = time_speak(tl_with(said("the", "time", "is", "up", start=2.8), speak_requests=REQ))
    assert r["requests"][0]["onset"] is None and r["accuracy"] == 0.0 and r["timing_error"] is None
    # a trailing word at exactly time - tolerance is the attempt (on time, wrong content)
    r = time_speak(tl_with(said("the", "time", "is", "up", start=3.0), speak_requests=REQ))
    assert r["requests"][0]["onset"] == 3.6 and r["requests"][0]["on_time"] and not r["requests"][0]["content_ok"]


def test_time_speak_needs_timing_and_content():
    r = time_speak(tl_with(said("the", "weather", "is", "nice", start=4.0), speak_requests=REQ))
    assert r["requests"][0]["on_time"] and not r["requests"][0]["content_ok"] and r["accuracy"] == 0.0
    t = tl_with(said("um", "The", "time,", "is", "up!", start=4.0), speak_requests=REQ)
    r = time_speak(t)
    assert r["accuracy"] == 1.0
    assert r["credit"][t.micro_turn_at(4.0)] == 1.0 and sum(r["credit"]) == 1.0
    r = time_speak(tl_with(said("the", "time", "is", "up", start=4.6), speak_requests=REQ))
    assert r["credit"][23] == -1.0


def test_content_rule_is_an_ordered_subsequence_of_the_first_2k_words():
    w = lambda *t: [Word(x, 0.0, 0.0) for x in t]  # noqa: E731
    assert content_matches(w("uh", "time", "up"), "time up")
    assert not content_matches(w("up", "time"), "time up")
    assert not content_matches(w("a", "b", "c", "time", "up"), "time up")  # beyond the first 4 words
    assert content_matches(w("anything"), "")


@pytest.mark.parametrize("delay,in_time", [(0.0, True), (0.4, True), (CUESPEAK_DEADLINE_S, True), (1.2, False)])
def test_cue_speak_deadline(delay, in_time):
    cues = (Cue("go", 3.0, "ready"),)
    r = cue_speak(tl_with(said("ready", start=3.0 + delay), cues=cues))
    assert r["cues"][0]["in_time"] is in_time and r["accuracy"] == (1.0 if in_time else 0.0)
    assert r["latency"] == pytest.approx(delay)


def test_cue_speak_ignores_speech_before_the_cue_and_checks_content():
    cues = (Cue("go", 3.0, "ready"),)
    r = cue_speak(tl_with(said("ready", start=2.0) + said("no", start=3.4), cues=cues))
    assert r["cues"][0]["latency"] == pytest.approx(0.4) and not r["cues"][0]["content_ok"]
    r = cue_speak(tl_with(said("anything", start=3.2), cues=(Cue("go", 3.0),)))
    assert r["accuracy"] == 1.0
    r = cue_speak(tl_with([], cues=cues))
    assert r["accuracy"] == 0.0 and r["latency"] is None and r["credit"][15] == -1.0


def test_spoken_numbers():
    w = lambda *t: [Word(x, 0.0, 0.0) for x in t]  # noqa: E731
    assert spoken_numbers(w("one,", "two", "Three.", "12", "twenty-one", "thirty", "two", "forty")) == [
        1, 2, 3, 12, 21, 32, 40]
    assert spoken_numbers(w("none", "here")) == []


@pytest.mark.parametrize("pred_words,pred,obo", [(["ten"], 10, True), (["I", "counted", "11"], 11, True),
                                                 (["eight"], 8, False), (["seven", "no", "nine"], 9, True),
                                                 ([], 0, False)])
def test_rep_count_metrics(pred_words, pred, obo):
    t = tl_with(said("two", start=0.2) + said(*pred_words, start=2.0), repetitions=RepetitionCount(10, asked_at=1.0))
    r = rep_count(t)
    assert r["predicted"] == pred and r["obo"] is obo
    assert r["normalized_error"] == abs(pred - 10) / 10
    assert rep_count(t, denominator_offset=0.1)["normalized_error"] == pytest.approx(abs(pred - 10) / 10.1)


def test_rep_count_aggregate_is_repcount_a_mae_and_obo():
    results = [rep_count(tl_with(said(p, start=0.2), repetitions=RepetitionCount(c))) for p, c in
               [("4", 5), ("5", 5), ("10", 8), ("20", 10)]]
    s = aggregate({"repcount": results})["repcount"]
    assert s["normalized_error"] == pytest.approx((0.2 + 0.0 + 0.25 + 1.0) / 4)  # MAE
    assert s["obo"] == pytest.approx(0.5)  # OBO


@pytest.mark.parametrize("fn,match", [(time_speak, "speak_requests"), (cue_speak, "cues"), (rep_count, "repetitions")])
def test_missing_annotation_is_a_clear_error(fn, match):
    with pytest.raises(ValueError, match=match):
        fn(Timeline("empty", [0]))
