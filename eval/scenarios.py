"""Synthetic scenarios -> scored samples: the reference half and the model half of a Timeline.

A generated :class:`~tml.stream.Conversation` (``tml.data_pipelines.scenarios``) holds a
whole interaction (several turns, pauses, cues ...). :func:`reference` turns it into a
:class:`Reference`: the user's side of a :class:`~tml.eval.timeline.Timeline` (speech
segments and words), its length in micro-turns, and a list of :class:`Task` s -- each one
scorer of ``tml.eval`` applied to one *window* of the conversation with the annotations
it needs. :func:`model_parts` turns a policy's per-micro-turn outputs into the model's
side, and :func:`score` runs every task on the two halves.

Held-out seeds
--------------
The training corpus (``tml data build``, ``data_pipelines/build.py``) draws conversation
``i`` as ``make_conversation(scenarios[i % k], data.seed, i)`` with ``i`` in
``[0, data.n_conversations)`` (train) and ``[10**9, 10**9 + data.eval_conversations)``
(its held-out loss split). A conversation's randomness is keyed by
``(seed, index, crc32(scenario), attempt)`` only, so any index outside those ranges is a
conversation no training run has seen. Evaluation scenarios use
``index = HELD_OUT_INDEX_OFFSET + k`` (:data:`HELD_OUT_INDEX_OFFSET` = 2 * 10**9,
``k = 0, 1, ...`` per scenario): disjoint from both training ranges for any corpus of
fewer than 10**9 conversations, for every ``data.seed``.

Windows: why tasks score a slice of the conversation
---------------------------------------------------
Full-Duplex-Bench scores *clips*: one user turn, pause or interruption per sample, with
all of the model's words in the clip. A synthetic conversation holds several events, so
each task scores the window around its event, shifted to start at 0 (windows start and
end on micro-turn boundaries; a model word belongs to the window its start falls in and
is cut at the window's end):

=====================  ====================  ==========================================
scenario               task (scorer)         window, annotation
=====================  ====================  ==========================================
turn_taking            smooth_turn_taking    per user turn: its start .. the next user
                                             turn; ``turn_ends`` = its end
typed_text             smooth_turn_taking    typed question .. end; ``turn_ends`` = its
                                             arrival
delegate               smooth_turn_taking    background result .. end; ``turn_ends`` =
                                             its arrival
mid_pause              pause_handling        the paused turn's start .. its end (lower
                                             is better); ``pauses``
backchannel            backchannel           start .. the story's end; the reference
                                             timing is the scenario's target backchannels
                                             (runs of target speaking micro-turns), not
                                             FD-bench's ICC histogram
interruption           user_interruption     whole; ``user_interruption`` event =
                       overlap_interruption  the user's follow-up question (v1.5-style
                                             rule, ``response_words`` = the target answer)
background_speech      background_takeover   per background utterance: its start .. 1 s
                                             after it (or the model's next target
                                             utterance); FD-bench's take-turn rule
                                             (lower is better)
cue_speak              cue_speak             whole; a cue per target cue (time = end of
                                             the cue word, response = the cue response)
time_speak             time_speak            whole; request = (target time, target word)
rep_count              rep_count             whole; count, asked at the end of the motion
=====================  ====================  ==========================================

Model words from the text channel (:func:`text_words`)
-----------------------------------------------------
A policy emits text bytes per micro-turn. The bytes of all micro-turns are read as one
stream and cut into words at ASCII whitespace; each word is decoded as UTF-8 (bad bytes
replaced). A word's **start** is the start of the micro-turn its first byte was emitted
in, plus ``i / k`` of a micro-turn when it is the ``i``-th of ``k`` words starting in
that micro-turn (so words emitted together are ordered and do not share a start). Its
**end** is the next word's start when the model speaks without a break from the word's
last byte to that start (fluent speech), else the end of the model's speech run holding
the word's last byte, else (text without speech) the end of that micro-turn, never past
the next word's start. Times are therefore accurate to one micro-turn (0.2 s): a
latency is the micro-turn the answer began in minus the reference time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tml.eval.fdb_v1 import backchannel, pause_handling, smooth_turn_taking, user_interruption
from tml.eval.overlap import overlap_behaviours
from tml.eval.tasks import cue_speak, rep_count, time_speak
from tml.eval.timeline import (
    MICRO_TURNS_PER_S,
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

HELD_OUT_INDEX_OFFSET = 2_000_000_000
"""First conversation index of the evaluation scenarios (module docstring: held-out seeds)."""

BACKGROUND_WINDOW_AFTER_S = 1.0
"""background_takeover: the model must stay silent this long after background speech
(the scenario's ``must_stay_silent`` rule)."""

_WHITESPACE = b" \t\n\r\x0b\x0c"


class SampleError(ValueError):
    """A sample cannot be scored (bad input); the runner reports it and goes on."""


# ------------------------------------------------------------------ the model's half
@dataclass(frozen=True)
class MicroTurnOutput:
    """What a policy emitted in one micro-turn.

    ``text``: bytes of its text channel; ``speaking``: speech frames (True) or
    ``<silence>`` (False); ``control``: control tokens such as ``"<backchannel>"``.
    """

    text: bytes = b""
    speaking: bool = False
    control: tuple[str, ...] = ()


SILENT = MicroTurnOutput()


@dataclass(frozen=True)
class ModelParts:
    """The model's side of a Timeline over a whole conversation (absolute times)."""

    speaking: tuple[bool, ...]
    words: tuple[Word, ...]
    control_tokens: tuple[ControlToken, ...]


def _speech_run_end(speaking: Sequence[bool], t: int) -> int | None:
    """Exclusive end (micro-turn) of the speaking run holding micro-turn t, or None if silent."""
    if not speaking[t]:
        return None
    while t < len(speaking) and speaking[t]:
        t += 1
    return t


def text_words(texts: Sequence[bytes], speaking: Sequence[bool]) -> list[Word]:
    """Words with times from per-micro-turn text bytes (module docstring's rule).

    texts: [n] bytes per micro-turn; speaking: [n] bools. Returns ordered,
    non-overlapping words (``start <= end``).
    """
    if len(texts) != len(speaking):
        raise ValueError(f"{len(texts)} text entries for {len(speaking)} micro-turns")
    spans: list[tuple[bytes, int, int]] = []  # (bytes, first micro-turn, last micro-turn)
    cur, first, last = bytearray(), None, None
    for t, chunk in enumerate(texts):
        for b in bytes(chunk):
            if b in _WHITESPACE:
                if cur:
                    spans.append((bytes(cur), first, last))
                    cur = bytearray()
            else:
                if not cur:
                    first = t
                cur.append(b)
                last = t
    if cur:
        spans.append((bytes(cur), first, last))
    per_turn: dict[int, int] = {}
    for _, f, _ in spans:
        per_turn[f] = per_turn.get(f, 0) + 1
    rank: dict[int, int] = {}
    starts = []
    for _, f, _ in spans:
        i = rank.get(f, 0)
        rank[f] = i + 1
        starts.append((f + i / per_turn[f]) / MICRO_TURNS_PER_S)
    words = []
    for j, (raw, f, lt) in enumerate(spans):
        start = starts[j]
        nxt = starts[j + 1] if j + 1 < len(spans) else math.inf
        run_end = _speech_run_end(speaking, lt)
        if run_end is not None:
            nxt_turn = spans[j + 1][1] if j + 1 < len(spans) else None
            end = nxt if nxt_turn is not None and nxt_turn < run_end else run_end / MICRO_TURNS_PER_S
        else:
            end = (lt + 1) / MICRO_TURNS_PER_S
        end = max(start, min(end, nxt))
        words.append(Word(raw.decode("utf-8", errors="replace"), start, end))
    return words


def model_parts(outputs: Sequence[MicroTurnOutput]) -> ModelParts:
    """A policy's per-micro-turn outputs -> the model's side of the Timeline."""
    speaking = tuple(bool(o.speaking) for o in outputs)
    words = text_words([o.text for o in outputs], speaking)
    controls = tuple(ControlToken(c, t / MICRO_TURNS_PER_S) for t, o in enumerate(outputs) for c in o.control)
    return ModelParts(speaking, tuple(words), controls)


# ------------------------------------------------------------------ the reference half
Scorer = Callable[[Timeline], Any]


@dataclass(frozen=True)
class Task:
    """One scorer on one window ``[t0, t1)`` micro-turns; ``annotations`` in absolute seconds."""

    name: str
    scorer: Scorer
    t0: int
    t1: int
    annotations: Annotations = field(default_factory=Annotations)


@dataclass(frozen=True)
class Reference:
    """The user's side of one scenario and the tasks to score it by."""

    sample_id: str
    scenario: str
    n_micro_turns: int
    user_segments: tuple[tuple[float, float], ...]
    user_words: tuple[Word, ...]
    tasks: tuple[Task, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)


def _mt(time: float) -> int:
    """Micro-turn containing ``time`` (1 ns slack, as Timeline.micro_turn_at)."""
    return math.floor(time * MICRO_TURNS_PER_S + 1e-9)


def _merged(spans: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _utterances(conv, speaker: str) -> list[tuple[float, float, str]]:
    return [(float(a), float(b), str(text)) for sp, a, b, text in conv.meta["utterances"] if sp == speaker]


def _turn_task(n: int, start: float, ref_time: float, end_time: float | None) -> Task:
    t1 = n if end_time is None else max(_mt(end_time), _mt(ref_time) + 1)
    return Task("smooth_turn_taking", smooth_turn_taking, _mt(start), min(t1, n), Annotations(turn_ends=(ref_time,)))


def _target_speaking(conv, n: int) -> list[bool]:
    """Per micro-turn: does the scenario's target have the model speaking (to_micro_turns' rule)."""
    speaking = [False] * n
    for w in conv.words:
        if w.speaker == "model":
            a, b = min(_mt(w.start), n - 1), min(_mt(max(w.start, w.end - 1e-6)), n - 1)
            for t in range(a, b + 1):
                speaking[t] = True
    return speaking


def _tasks(conv, n: int) -> list[Task]:
    m, sc = conv.meta, conv.scenario
    users, models = _utterances(conv, "user"), _utterances(conv, "model")

    def next_user_start(after: float) -> float | None:
        return next((a for a, _, _ in users if a > after + 1e-9), None)

    if sc == "turn_taking":
        tasks = []
        for end in m["turn_ends"]:
            start = max((a for a, b, _ in users if b <= end + 1e-9), default=0.0)
            tasks.append(_turn_task(n, start, end, next_user_start(end)))
        return tasks
    if sc == "typed_text":
        return [_turn_task(n, m["typed_time"], m["typed_time"], next_user_start(m["typed_time"]))]
    if sc == "delegate":
        return [_turn_task(n, m["result_time"], m["result_time"], None)]
    if sc == "mid_pause":
        p0, p1 = m["pause"]
        start = max((a for a, b, _ in users if b <= p0 + 1e-9), default=0.0)
        return [Task("pause_handling", pause_handling, _mt(start), max(_mt(m["turn_end"]), _mt(p1) + 1),
                     Annotations(pauses=((p0, p1),)))]
    if sc == "backchannel":
        t1 = _mt(m["turn_end"])
        runs = _runs(_target_speaking(conv, n)[:t1])
        ref = _fdb_histogram(runs, t1 / MICRO_TURNS_PER_S)
        return [Task("backchannel", _backchannel, 0, t1, Annotations(backchannel_reference=ref))]
    if sc == "interruption":
        start, end = m["interrupt_time"], m["turn_end"]
        answer = next((text for a, _, text in models if abs(a - m["response_start"]) < 1e-6), "")
        words = tuple(w for w in (x.strip(".,?!") for x in answer.split()) if w)
        ann_v1 = Annotations(overlaps=(OverlapEvent("user_interruption", start, end),))
        ann_v15 = Annotations(overlaps=(OverlapEvent("user_interruption", start, end, words),))
        return [Task("user_interruption", user_interruption, 0, n, ann_v1),
                Task("overlap_interruption", lambda tl: overlap_behaviours(tl)[0], 0, n, ann_v15)]
    if sc == "background_speech":
        tasks = []
        for a, b in m["other_spans"]:
            stop = b + BACKGROUND_WINDOW_AFTER_S
            nxt_model = next((s for s, _, _ in models if s > a), None)
            if nxt_model is not None:
                stop = min(stop, nxt_model)
            t0, t1 = _mt(a), _mt(stop)
            if t1 > t0:
                tasks.append(Task("background_takeover", pause_handling, t0, min(t1, n)))
        return tasks
    if sc == "cue_speak":
        cues = tuple(Cue(m["cue_word"], c1, m["cue_response"]) for _, c1 in m["cues"])
        return [Task("cue_speak", cue_speak, 0, n, Annotations(cues=cues))]
    if sc == "time_speak":
        req = (SpeakRequest(m["target_time"], m["target_word"]),)
        return [Task("time_speak", time_speak, 0, n, Annotations(speak_requests=req))]
    if sc == "rep_count":
        reps = RepetitionCount(int(m["expected_count"]), float(m["motion"][1]))
        return [Task("rep_count", rep_count, 0, n, Annotations(repetitions=reps))]
    raise SampleError(f"{conv.id}: scenario {sc!r} has no evaluation task; known: see tml.eval.scenarios")


def _backchannel(tl: Timeline) -> dict[str, Any]:
    """``backchannel`` with a NaN JSD read as 0: scipy's ``jensenshannon`` returns NaN when
    rounding makes the divergence of two identical histograms slightly negative (seen here
    when the oracle's backchannels equal the reference exactly), and that distance is 0."""
    with np.errstate(invalid="ignore"):  # the NaN is handled below
        result = backchannel(tl)
    if isinstance(result["jsd"], float) and math.isnan(result["jsd"]):
        result["jsd"] = 0.0
    return result


def _runs(active: Sequence[bool]) -> list[tuple[float, float]]:
    tl = Timeline("runs", tuple(active) or (False,))
    return tl.model_speech_segments()


def _fdb_histogram(segments: Sequence[tuple[float, float]], duration: float) -> tuple[float, ...]:
    """FD-bench's backchannel timing histogram (``backchannel_jsd``'s binning), unnormalised + 1e-10."""
    hist = [0.0] * (int(duration / 0.2) + 1)
    for s, e in segments:
        for k in range(int(s / 0.2), min(int(e / 0.2), len(hist) - 1) + 1):
            hist[k] += 1.0
    return tuple(h + 1e-10 for h in hist)


def reference(conv) -> Reference:
    """A generated Conversation -> its Reference (user side + tasks); SampleError if malformed."""
    n = conv.n_micro_turns
    try:
        user_words = tuple(Word(w.text, w.start, w.end) for w in conv.words if w.speaker == "user")
        segs = tuple(_merged([(a, b) for a, b, _ in _utterances(conv, "user")]))
        tasks = tuple(_tasks(conv, n))
    except KeyError as e:
        raise SampleError(f"{conv.id}: scenario meta lacks {e}; regenerate it with data_pipelines.scenarios") from e
    return Reference(conv.id, conv.scenario, n, segs, user_words, tasks, meta=dict(conv.meta))


# ------------------------------------------------------------------ scoring
def window(ref: Reference, parts: ModelParts, t0: int, t1: int, annotations: Annotations,
           name: str) -> Timeline:
    """The Timeline of micro-turns ``[t0, t1)``, every time shifted by ``-t0 / 5`` s.

    User segments and words are clipped to the window; model words starting in it are
    kept (cut at its end); annotations are shifted and must lie inside it.
    """
    if len(parts.speaking) != ref.n_micro_turns:
        raise SampleError(
            f"{ref.sample_id}: the policy returned {len(parts.speaking)} micro-turns for a scenario of "
            f"{ref.n_micro_turns}; a policy must answer every micro-turn once"
        )
    lo, hi = t0 / MICRO_TURNS_PER_S, t1 / MICRO_TURNS_PER_S
    length = (t1 - t0) / MICRO_TURNS_PER_S  # the window Timeline's duration, computed as it computes it

    def shift(x: float) -> float:
        return min(max(x - lo, 0.0), length)

    def clip_words(ws: Sequence[Word], by_start: bool) -> tuple[Word, ...]:
        out = []
        for w in ws:
            inside = lo - 1e-9 <= w.start < hi - 1e-9 if by_start else (w.end > lo and w.start < hi)
            if inside:
                out.append(Word(w.text, shift(w.start), shift(w.end)))
        return tuple(out)

    segs = tuple((shift(a), shift(b)) for a, b in ref.user_segments if b > lo and a < hi and shift(b) > shift(a))
    a = annotations
    ann = Annotations(
        turn_ends=tuple(shift(t) for t in a.turn_ends),
        pauses=tuple((shift(p), shift(q)) for p, q in a.pauses),
        cues=tuple(replace(c, time=shift(c.time)) for c in a.cues),
        speak_requests=tuple(replace(r, time=shift(r.time)) for r in a.speak_requests),
        repetitions=None if a.repetitions is None else replace(a.repetitions, asked_at=shift(a.repetitions.asked_at)),
        overlaps=tuple(replace(o, start=shift(o.start), end=shift(o.end)) for o in a.overlaps),
        backchannel_reference=a.backchannel_reference,
    )
    return Timeline(
        sample_id=f"{ref.sample_id}/{name}",
        model_speaking=parts.speaking[t0:t1],
        model_words=clip_words(parts.words, by_start=True),
        user_segments=segs,
        user_words=clip_words(ref.user_words, by_start=False),
        control_tokens=tuple(ControlToken(c.token, shift(c.time)) for c in parts.control_tokens
                             if lo - 1e-9 <= c.time < hi - 1e-9),
        annotations=ann,
    )


def scalars(result: Mapping[str, Any]) -> dict[str, Any]:
    """The per-sample numbers of a scorer's result (per-micro-turn credit and lists dropped)."""
    return {k: v for k, v in result.items() if v is None or isinstance(v, (bool, int, float, str))}


def score(ref: Reference, outputs: Sequence[MicroTurnOutput], *, credit: bool = False) -> list[dict[str, Any]]:
    """Every task of ``ref`` on a policy's outputs: ``[{"task", "window": [t0, t1], **scalars}]``;
    ``credit=True`` also keeps each scorer's per-micro-turn ``credit`` (floats [t1 - t0],
    window-local; absent for scorers that give none).

    Raises SampleError (naming the sample) if the outputs or a window are malformed.
    """
    parts = model_parts(outputs)
    rows = []
    for k, task in enumerate(ref.tasks):
        try:
            tl = window(ref, parts, task.t0, task.t1, task.annotations, f"{task.name}{k}")
            result = task.scorer(tl)
        except (TimelineError, ValueError) as e:
            raise SampleError(f"{ref.sample_id}: task {task.name} (micro-turns {task.t0}..{task.t1}): {e}") from e
        rows.append({"task": task.name, "window": [task.t0, task.t1], **scalars(result)})
        if credit and isinstance(result, Mapping) and result.get("credit") is not None:
            rows[-1]["credit"] = [float(x) for x in result["credit"]]
    return rows
