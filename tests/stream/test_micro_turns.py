"""Conversation → micro-turns: assignment rules and causality of the features."""

import numpy as np

from tests.stream.toy_conversation import toy_conversation
from tml.stream import Conversation, Event, Word, layout, to_micro_turns, unlayout


def conv_with(words=(), events=(), seconds=2.0, video=None):
    n = int(seconds * 16000)
    rng = np.random.default_rng(0)
    user = (0.1 * rng.standard_normal(n)).astype(np.float32)
    model = (0.1 * rng.standard_normal(n)).astype(np.float32)
    return Conversation("c", "test", user, model, list(words), list(events), video)


def test_model_speaks_exactly_where_its_words_are():
    turns = to_micro_turns(conv_with([Word("yes", 0.3, 0.7, "model"), Word("hm", 0.0, 1.9, "user")]))
    assert [t.model_speech is not None for t in turns] == [False, True, True, True] + [False] * 6


def test_events_land_in_their_micro_turn():
    events = [Event(0.05, "typed", "hi"), Event(0.41, "model_text", "sure"), Event(0.45, "model_text", "thing"),
              Event(1.0, "background", "done"), Event(1.2, "backchannel"), Event(1.25, "delegate", "search")]
    turns = to_micro_turns(conv_with(events=events))
    assert turns[0].typed == "hi"
    assert turns[2].model_text == "sure thing"
    assert turns[5].background == "done"
    assert turns[6].control == ("<backchannel>", "<delegate>") and turns[6].model_text == "search"


def test_video_pairs_per_micro_turn():
    video = np.arange(15, dtype=np.uint8)[:, None, None, None] * np.ones((1, 40, 80, 3), np.uint8)
    turns = to_micro_turns(conv_with(video=video))
    assert turns[0].video.shape == (2, 2, 40, 40, 3)
    assert turns[3].video[0, 0].max() == 6 and turns[3].video[0, 1].max() == 7
    assert turns[7].video[0, 0].max() == 14 and turns[7].video[0, 1].max() == 14  # odd tail duplicated
    assert turns[8].video is None


def test_audio_after_micro_turn_t_never_changes_micro_turns_up_to_t():
    conv = toy_conversation(3)
    base = to_micro_turns(conv)
    for t in (0, 3, len(base) - 2):
        changed = toy_conversation(3)
        start = 3200 * (t + 1)
        changed.user_audio[start:] = np.random.default_rng(t).uniform(-1, 1, len(changed.user_audio) - start)
        changed.model_audio[start:] = 0.5
        after = to_micro_turns(changed)
        assert all(a.equals(b) for a, b in zip(base[: t + 1], after[: t + 1]))
        assert not all(a.equals(b) for a, b in zip(base[t + 1:], after[t + 1:]))


def test_conversation_round_trip_through_tokens():
    conv = toy_conversation(0)  # has video, events, backchannel
    turns = to_micro_turns(conv)
    back = unlayout(layout(turns))
    assert len(back) == conv.n_micro_turns
    assert all(a.equals(b) for a, b in zip(turns, back))
