"""v1.5-style overlap scoring: FD-bench timing parity and the documented behaviour rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tml.eval import Annotations, OverlapEvent, Timeline, Word, aggregate, overlap_behaviour, overlap_behaviours, timing_intervals
from tml.eval.overlap import RESPONSE_WINDOW_S, STOP_WINDOW_S

TIMING = json.loads((Path(__file__).parent / "fixtures" / "fdb_v15" / "timing_cases.json").read_text())


@pytest.mark.parametrize("case", TIMING["cases"], ids=[c["timeline"]["sample_id"] for c in TIMING["cases"]])
def test_timing_intervals_match_fdb_get_timing(case):
    got = timing_intervals(Timeline.from_dict(case["timeline"]))
    ref = case["reference"]
    for key in ("latency_stop_list", "latency_resp_list"):
        assert len(got[key]) == len(ref[key]), key
        for g, r in zip(got[key], ref[key]):
            assert g == pytest.approx(r, abs=1e-9, rel=0), key


def test_timing_fixture_is_from_the_recorded_commit_and_not_trivial():
    assert TIMING["source"]["commit"] == "d7336bda1385872b83b48a8d45d9c0003836a60d"
    assert len(TIMING["cases"]) >= 10
    assert sum(bool(c["reference"]["latency_resp_list"]) for c in TIMING["cases"]) >= 5


def speaking(n, *runs):
    s = [0] * n
    for a, b in runs:
        s[a:b] = [1] * (b - a)
    return s


def conv(runs, words=(), n=60, **event):
    """Timeline of n micro-turns with one overlap event."""
    ev = OverlapEvent(event.pop("kind"), event.pop("start"), event.pop("end"), tuple(event.pop("response_words", ())))
    tl = Timeline("ov", speaking(n, *runs), model_words=[Word(*w) for w in words])
    return tl, ev


INTERRUPT = dict(kind="user_interruption", start=4.0, end=5.0, response_words=("fiction",))


def test_interruption_stop_then_respond():
    tl, ev = conv([(0, 23), (27, 40)], [("books", 1.0, 1.5), ("sure", 5.4, 5.6), ("fiction", 5.6, 6.0)], **INTERRUPT)
    r = overlap_behaviour(tl, ev)
    assert r["speaking_at_onset"] and r["stopped"]
    assert r["stop_latency"] == pytest.approx(0.6)  # silence starts at micro-turn 23 = 4.6 s
    assert r["spoke_again"] and r["response_latency"] == pytest.approx(0.4)  # onset at 5.4 s
    assert r["behaviour"] == "respond" and r["success"]
    assert r["credit"][20:23] == [-0.2] * 3 and sum(r["credit"]) == pytest.approx(-0.6)


def test_interruption_talked_through_is_continue_and_fails():
    tl, ev = conv([(0, 50)], **INTERRUPT)
    r = overlap_behaviour(tl, ev)
    assert r["behaviour"] == "continue" and r["stopped"] is False and not r["success"]


def test_one_micro_turn_breath_is_not_a_stop():
    tl, ev = conv([(0, 22), (23, 50)], **INTERRUPT)  # silent only in micro-turn 22
    assert overlap_behaviour(tl, ev)["behaviour"] == "continue"


def test_stop_later_than_window_is_continue():
    late = round((4.0 + STOP_WINDOW_S) * 5) + 1  # silence begins one micro-turn after the window
    tl, ev = conv([(0, late), (late + 5, 58)], **INTERRUPT)
    assert overlap_behaviour(tl, ev)["behaviour"] == "continue"
    tl, ev = conv([(0, late - 1), (late + 5, 58)], [("fiction", 7.0, 7.4)], **INTERRUPT)
    assert overlap_behaviour(tl, ev)["stopped"] is True


def test_interruption_stopped_and_silent():
    tl, ev = conv([(0, 22)], **INTERRUPT)
    r = overlap_behaviour(tl, ev)
    assert r["stopped"] and r["behaviour"] == "silent" and not r["spoke_again"] and r["response_latency"] is None


def test_response_after_window_is_silent():
    onset = round((5.0 + RESPONSE_WINDOW_S) * 5) + 1
    tl, ev = conv([(0, 22), (onset, 58)], [("fiction", onset / 5, onset / 5 + 0.3)], **INTERRUPT)
    assert overlap_behaviour(tl, ev)["behaviour"] == "silent"
    tl, ev = conv([(0, 22), (onset - 1, 58)], [("fiction", (onset - 1) / 5, onset / 5)], **INTERRUPT)
    assert overlap_behaviour(tl, ev)["behaviour"] == "respond"


def test_interruption_without_response_word_is_resume():
    tl, ev = conv([(0, 22), (27, 40)], [("anyway", 5.4, 5.8), ("self", 5.8, 6.0), ("help", 6.0, 6.4)], **INTERRUPT)
    r = overlap_behaviour(tl, ev)
    assert r["behaviour"] == "resume" and not r["success"]


def test_response_words_are_normalised_and_limited_to_the_utterance():
    # "Fiction," matches "fiction"; a later utterance's match does not count
    tl, ev = conv([(0, 22), (27, 40)], [("Fiction,", 5.4, 5.8)], **INTERRUPT)
    assert overlap_behaviour(tl, ev)["behaviour"] == "respond"
    tl, ev = conv([(0, 22), (27, 30), (40, 45)], [("so", 5.4, 5.6), ("fiction", 8.0, 8.4)], **INTERRUPT)
    assert overlap_behaviour(tl, ev)["behaviour"] == "resume"


def test_interruption_without_annotated_words_counts_new_speech_as_respond():
    tl, ev = conv([(0, 22), (27, 40)], kind="user_interruption", start=4.0, end=5.0)
    assert overlap_behaviour(tl, ev)["behaviour"] == "respond"


@pytest.mark.parametrize("kind", ["user_backchannel", "talking_to_others", "background_speech"])
def test_non_interruptions_should_not_derail(kind):
    tl, ev = conv([(0, 50)], kind=kind, start=4.0, end=4.6)
    assert overlap_behaviour(tl, ev)["behaviour"] == "continue" and overlap_behaviour(tl, ev)["success"]
    tl, ev = conv([(0, 22), (26, 50)], [("anyway", 5.2, 5.6)], kind=kind, start=4.0, end=4.6)
    r = overlap_behaviour(tl, ev)
    assert r["behaviour"] == "resume" and r["success"]
    assert r["credit"][22:26] == [-0.2] * 4 and sum(r["credit"]) == pytest.approx(-0.8)  # derailed micro-turns
    tl, ev = conv([(0, 22), (26, 50)], [("who", 5.2, 5.4), ("Bob", 5.4, 5.6)], kind=kind, start=4.0, end=4.6,
                  response_words=("bob",))
    r = overlap_behaviour(tl, ev)
    assert r["behaviour"] == "respond" and not r["success"]


def test_model_silent_at_onset_then_speaks():
    tl, ev = conv([(30, 40)], kind="background_speech", start=4.0, end=5.0)
    r = overlap_behaviour(tl, ev)
    assert not r["speaking_at_onset"] and r["stopped"] is None and r["stop_latency"] is None
    assert r["behaviour"] == "resume" and r["response_latency"] == pytest.approx(1.0)


def test_speech_starting_during_the_overlap_has_zero_response_latency():
    tl, ev = conv([(22, 40)], kind="user_interruption", start=4.0, end=5.0)
    assert overlap_behaviour(tl, ev)["response_latency"] == 0.0


def test_overlap_behaviours_aggregate_to_rates():
    tl = Timeline("a", speaking(60, (0, 22), (27, 40)), model_words=[Word("fiction", 5.4, 5.8)],
                  annotations=Annotations(overlaps=(OverlapEvent("user_interruption", 4.0, 5.0, ("fiction",)),)))
    results = overlap_behaviours(tl) + [overlap_behaviour(*conv([(0, 50)], **INTERRUPT))]
    s = aggregate({"user_interruption": results})["user_interruption"]
    assert s["n"] == 2 and s["success"] == 0.5
    assert s["behaviour"] == {"continue": 0.5, "respond": 0.5}
    assert s["stop_latency_n"] == 1 and s["stop_latency"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="annotations.overlaps"):
        overlap_behaviours(Timeline("b", [0]))
