"""Timeline: JSON round trip, derived views, and validation errors that name sample and field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tml.eval import (
    Annotations,
    ControlToken,
    Cue,
    OverlapEvent,
    RepetitionCount,
    SpeakRequest,
    Timeline,
    TimelineError,
    Word,
)


def full_timeline() -> Timeline:
    return Timeline(
        sample_id="conv-7",
        model_speaking=[0, 0, 1, 1, 1, 0, 0, 1, 0, 0],
        model_words=[Word("hi", 0.4, 0.6), Word("there", 0.6, 0.95), Word("mhm", 1.4, 1.4)],
        user_segments=[(0.0, 0.3), (1.0, 1.8)],
        user_words=[Word("hey", 0.0, 0.3), Word("so", 1.0, 1.2)],
        control_tokens=[ControlToken("<backchannel>", 1.4), ControlToken("<delegate>", 1.6)],
        annotations=Annotations(
            turn_ends=(0.3,), pauses=((0.3, 1.0),), cues=(Cue("go", 1.2, "ok"),),
            speak_requests=(SpeakRequest(1.5, "now"),), repetitions=RepetitionCount(3, 0.5),
            overlaps=(OverlapEvent("user_backchannel", 1.0, 1.2, ("yes",)),),
            backchannel_reference=(0.2, 0.5, 0.3),
        ),
    )


def test_json_round_trip_is_exact():
    tl = full_timeline()
    d = json.loads(json.dumps(tl.to_dict()))
    back = Timeline.from_dict(d)
    assert back == tl
    assert back.to_dict() == tl.to_dict()


def test_derived_views():
    tl = full_timeline()
    assert tl.n_micro_turns == 10 and tl.duration == 2.0
    assert tl.model_speech_segments() == [(0.4, 1.0), (1.4, 1.6)]
    # 0.6 * 5 is 3.0000000000000004 but 0.6 / 0.2 is 2.9999999999999996: boundaries go to the later micro-turn
    assert tl.micro_turn_at(0.6) == 3
    assert tl.micro_turn_at(0.599) == 2
    assert tl.micro_turn_at(2.0) == 9  # the conversation's end clips to the last micro-turn
    assert Timeline("s", np.array([True, False, True])).model_speech_segments() == [(0.0, 0.2), (0.4, 0.6)]
    assert Timeline("s", [1] * 3).duration == 3 / 5  # n / 5, not n * 0.2 (0.6000000000000001)


def bad(**overrides):
    d = full_timeline().to_dict()
    for k, v in overrides.items():
        if k.startswith("ann_"):
            d["annotations"][k[4:]] = v
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"user_segments": [[1.0, 1.8], [0.0, 0.3]]}, r"conv-7.*user_segments\[1\].*ordered and non-overlapping"),
        ({"user_segments": [[0.0, 1.1], [1.0, 1.8]]}, r"user_segments\[1\].*before the previous interval ends"),
        ({"user_segments": [[0.5, 0.5]]}, r"user_segments\[0\].*start 0.5 must be < end 0.5"),
        ({"user_segments": [[-0.1, 0.3]]}, r"user_segments\[0\].*negative time"),
        ({"model_words": [{"text": "late", "start": 1.9, "end": 2.1}]}, r"model_words\[0\].*after the conversation ends"),
        ({"model_words": [{"text": "a", "start": 0.5, "end": 0.4}]}, r"model_words\[0\].*starts at 0.5 s after it ends"),
        ({"model_words": [{"text": "a", "start": 0.5, "end": 0.8}, {"text": "b", "start": 0.7, "end": 0.9}]},
         r"model_words\[1\].*before the previous word 'a' ends"),
        ({"user_words": [{"text": "", "start": 0.1, "end": 0.2}]}, r"user_words\[0\].*non-empty"),
        ({"control_tokens": [{"token": "backchannel", "time": 0.2}]}, r"control_tokens\[0\].*'<name>'"),
        ({"control_tokens": [{"token": "<a>", "time": 0.4}, {"token": "<b>", "time": 0.2}]},
         r"control_tokens\[1\].*before the previous"),
        ({"model_speaking": []}, r"model_speaking.*empty"),
        ({"model_speaking": [0, 2]}, r"model_speaking\[1\].*not a bool"),
        ({"ann_turn_ends": [float("nan")]}, r"annotations.turn_ends\[0\].*finite"),
        ({"ann_pauses": [[0.3, 1.0], [0.9, 1.2]]}, r"annotations.pauses\[1\]"),
        ({"ann_overlaps": [{"kind": "noise", "start": 0.1, "end": 0.5}]}, r"annotations.overlaps\[0\].*kind 'noise'"),
        ({"ann_repetitions": {"count": 0, "asked_at": 0.0}}, r"annotations.repetitions.*>= 1"),
        ({"ann_speak_requests": [{"time": 0.2, "content": " "}]}, r"speak_requests\[0\].*content"),
        ({"ann_backchannel_reference": [1.0]}, r"backchannel_reference.*>= 2"),
        ({"surprise": 1}, r"conv-7.*unknown fields \['surprise'\]"),
        ({"ann_pause": []}, r"unknown annotations \['pause'\]"),
        ({"model_words": [{"text": "a", "begin": 0.1, "end": 0.2}]}, r"conv-7.*malformed field"),
    ],
)
def test_validation_errors_name_sample_and_field(overrides, match):
    with pytest.raises(TimelineError, match=match):
        Timeline.from_dict(bad(**overrides))


def test_touching_intervals_and_zero_length_words_are_valid():
    tl = Timeline("ok", [0] * 5, model_words=[Word("a", 0.2, 0.2), Word("b", 0.2, 0.4)],
                  user_segments=[(0.0, 0.4), (0.4, 1.0)])
    assert len(tl.user_segments) == 2 and tl.user_segments[1] == (0.4, 1.0)


def test_sample_id_required():
    with pytest.raises(TimelineError, match="sample_id"):
        Timeline("", [0])
    with pytest.raises(TimelineError, match="'model_speaking'.*required"):
        Timeline.from_dict({"sample_id": "x"})
