"""Minutes-long episodes and the reacting user (tml.rl.user): a model that talks over the
user makes them stop, a silent model gets its questions asked again, the user never
looks ahead, and the realised reference is what the eval scorers score."""

import types

import numpy as np
import pytest
from tml.eval.scenarios import MicroTurnOutput, score

from tml.rl.episodes import make_long_group
from tml.rl.user import Reactions, ReactiveUser

SPEAK = types.SimpleNamespace(speech=np.zeros((4, 80), np.uint8), text_bytes=b"hi ")
SILENT = types.SimpleNamespace(speech=np.zeros((0, 80), np.uint8), text_bytes=b"")


@pytest.fixture(scope="module")
def script():
    g, skipped, _ = make_long_group("turn_taking", 0, 0, 2, 60.0, Reactions())
    assert g is not None and not skipped
    return g.episodes[0].script


def play(script, model, rules=None, seed=1):
    """model(t, inputs so far) -> output of micro-turn t; returns (user, inputs)."""
    user = ReactiveUser(script, rules or Reactions(), seed)
    inputs = [user.first()]
    while True:
        x = user.next(model(len(inputs) - 1, inputs))
        if x is None:
            return user, inputs
        inputs.append(x)


def rms(a):
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64)))))


def test_a_long_script_lasts_a_minute_of_conversations_back_to_back(script):
    assert script.n_micro_turns >= 300 and len(script.segments) >= 4
    assert all(s.questions for s in script.segments)  # turn_taking asks questions
    user, inputs = play(script, lambda t, xs: SILENT, Reactions(0, 0.0))  # no reactions
    assert len(inputs) == script.n_micro_turns and user.reactions == []
    ref = user.reference()
    assert ref.n_micro_turns == len(inputs)
    k0 = script.segments[0].n + script.gap            # segment 1 starts after segment 0 and the gap
    assert ref.tasks[len(script.segments[0].ref.tasks)].t0 == k0 + script.segments[1].ref.tasks[0].t0
    np.testing.assert_array_equal(inputs[k0].audio, script.segments[1].inputs[0].audio)


def test_a_model_that_talks_over_the_user_makes_them_stop(script):
    user, inputs = play(script, lambda t, xs: SPEAK)
    stops = [r for r in user.reactions if r["kind"] == "stopped"]
    assert stops and not [r for r in user.reactions if r["kind"] == "repeated"]  # it always "answers"
    seg = script.segments[0]
    first = next(r for r in stops if r["segment"] == 0)
    a, b = seg.utterances[first["utterance"]]
    t = first["micro_turn"]                         # the first micro-turn the user no longer says
    assert t == int(a * 5 + 1e-9) + 2               # 2 micro-turns spoken over (stop_after), then silence
    orig = seg.inputs[t].audio
    assert rms(orig) > 10 * rms(inputs[t].audio)    # the rest of the utterance is room noise
    np.testing.assert_array_equal(inputs[t - 1].audio, seg.inputs[t - 1].audio)  # what was said before stays
    ref = user.reference()
    cut = t / 5
    assert any(abs(e - cut) < 1e-6 for _, e in ref.user_segments)      # the realised utterance ends at the cut
    assert not any(cut - 1e-6 <= w.start < b for w in ref.user_words)   # its unsaid words are gone
    rows = score(ref, [MicroTurnOutput(b"hi ", True)] * ref.n_micro_turns)
    assert len(rows) == len(ref.tasks)


def test_a_silent_model_is_asked_its_question_again(script):
    rules = Reactions(stop_after=2, repeat_after_s=2.0, max_repeats=1)
    user, inputs = play(script, lambda t, xs: SILENT, rules)
    reps = [r for r in user.reactions if r["kind"] == "repeated"]
    n_questions = sum(len(s.questions) for s in script.segments)
    assert reps and len(reps) <= n_questions
    assert len(inputs) > script.n_micro_turns and not [r for r in user.reactions if r["kind"] == "stopped"]
    r = user.repeats[0]
    seg = script.segments[r.k]
    a, b = seg.utterances[r.q]
    q0, q1 = int(a * 5 + 1e-9), int(b * 5 + 1e-9)
    ended = next(i for i, it in enumerate(user.played) if it.kind == "seg" and it.inst == 0 and it.k == r.k
                 and it.tau == q1)
    assert r.start == ended + 10                    # 2 s of silence after the micro-turn it ended in
    for i, tau in enumerate(range(q0, q1 + 1)):     # the question's own audio, again
        np.testing.assert_array_equal(inputs[r.start + i].audio, seg.inputs[tau].audio)
    ref = user.reference()
    keys = ref.meta["task_keys"]
    first, again = ref.tasks[keys.index((r.k, seg.questions[r.q], 0))], ref.tasks[keys.index((r.k, seg.questions[r.q], 1))]
    assert first.t1 == again.t0 == r.start
    assert abs(again.annotations.turn_ends[0] - (r.start / 5 + b - q0 / 5)) < 1e-9
    rows = score(ref, [MicroTurnOutput()] * ref.n_micro_turns, credit=True)
    turns = [x for x in rows if x["task"] == "smooth_turn_taking"]
    assert all(x["tor"] == 0 for x in turns) and all(len(x["credit"]) == x["window"][1] - x["window"][0] for x in turns)


def test_a_model_that_answers_is_not_asked_again(script):
    """Speaking right after each question's end (and silent otherwise): no repeat."""
    ends = set()
    t = 0
    for k, s in enumerate(script.segments):
        ends |= {t + int(s.utterances[q][1] * 5 + 1e-9) + 1 for q in s.questions}
        t += s.n + script.gap
    user, inputs = play(script, lambda t, xs: SPEAK if t in ends else SILENT)
    assert not [r for r in user.reactions if r["kind"] == "repeated"]
    assert len(inputs) == script.n_micro_turns


def test_the_user_never_looks_ahead(script):
    """Two models equal up to micro-turn T: the user's inputs agree up to T + 1."""
    T = 40
    _, a = play(script, lambda t, xs: SILENT)
    _, b = play(script, lambda t, xs: SILENT if t < T else SPEAK)
    for x, y in zip(a[:T + 2], b[:T + 2]):
        np.testing.assert_array_equal(x.audio, y.audio)
    assert any(not np.array_equal(x.audio, y.audio) for x, y in zip(a[T + 2:], b[T + 2:])) or len(a) != len(b)
