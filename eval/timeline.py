"""One conversation as plain data: the input every interactivity scorer reads.

A :class:`Timeline` is what a scorer needs to know about one evaluated conversation,
and nothing else (no audio, no tokens, no model). It is built from a sampler run or
from a benchmark's files, validated once, and then read by pure functions.

Conventions
-----------
* **Time** is in seconds (float) from the start of the conversation, which is the
  start of micro-turn 0. Micro-turn ``t`` covers ``[0.2 t, 0.2 (t + 1))`` s
  (:data:`MICRO_TURN_S`). The conversation lasts ``n_micro_turns * 0.2`` s; its
  duration is computed as ``n_micro_turns / 5`` (one correctly rounded division), so
  it equals what ``n_samples / sample_rate`` gives for the same audio length, which
  is what Full-Duplex-Bench divides by.
* **Intervals** are ``(start, end)`` with ``start < end``; a list of intervals is
  ordered and non-overlapping (touching is allowed: ``next.start >= prev.end``).
* **Words** are ``Word(text, start, end)`` with ``start <= end`` (a word emitted on
  the text channel at one instant may have ``start == end``), ordered by start and
  non-overlapping. A "word" is whatever unit the source produced: an ASR chunk
  (Full-Duplex-Bench counts chunks, fillers such as ``[UH]`` and punctuation-only
  chunks included) or a text-channel word. Scorers count words, they never
  re-tokenise text.
* Every time lies in ``[0, duration]``; a word or interval ending after the
  conversation ends is an error (the timeline and its source disagree on length).

Fields
------
``sample_id``
    Name of the conversation (a benchmark sample folder, a sampler session id).
    Every validation error names it.
``model_speaking``: ``tuple[bool, ...]`` of length ``n_micro_turns``
    Whether the model emitted speech (not ``<silence>``) in micro-turn ``t``. This is
    the model's own voice-activity signal; :meth:`Timeline.model_speech_segments`
    turns it into ``(start, end)`` runs. It also fixes the conversation's length.
``model_words``: ``tuple[Word, ...]``
    The model's words from its text channel (or ASR of its audio), with times.
``user_segments``: ``tuple[(start, end), ...]``
    The user's speech activity (from the benchmark's annotations or a VAD).
``user_words``: ``tuple[Word, ...]``
    The user's words with times (a transcript), when known.
``control_tokens``: ``tuple[ControlToken, ...]``
    Control tokens the model emitted (``<backchannel>``, ``<delegate>``, ...) with the
    start time of the micro-turn they were emitted in; ordered by time.
``annotations``: :class:`Annotations`
    What the scenario asked for; see that class. Scorers raise a clear error when the
    annotation they need is missing.

JSON: :meth:`Timeline.to_dict` gives plain lists/dicts/numbers/strings (``json.dumps``
ready) and :meth:`Timeline.from_dict` reads them back, validating; the round trip is
exact because floats are kept as Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MICRO_TURN_S = 0.2
"""Length of one micro-turn in seconds."""

MICRO_TURNS_PER_S = 5
"""Micro-turns per second (``1 / MICRO_TURN_S``), used for exact integer arithmetic."""

OVERLAP_KINDS = ("user_interruption", "user_backchannel", "talking_to_others", "background_speech")
"""The Full-Duplex-Bench v1.5 overlap scenarios an :class:`OverlapEvent` can be."""

BOUND_SLACK_S = 1e-9
"""Slack for float rounding at time bounds (1 ns): a time this close to a micro-turn boundary
belongs to the later micro-turn, and scorers' inclusive windows accept it."""


class TimelineError(ValueError):
    """A timeline (or the JSON it came from) breaks one of the conventions above."""


Interval = tuple[float, float]


@dataclass(frozen=True)
class Word:
    """One word with its time span in seconds (``start <= end``)."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class ControlToken:
    """A control token (e.g. ``"<backchannel>"``) and the time it was emitted, seconds."""

    token: str
    time: float


@dataclass(frozen=True)
class Cue:
    """CueSpeak: the user says ``word`` at ``time``; the model must answer after it.

    ``response`` is the expected content of the answer (empty: any speech counts).
    """

    word: str
    time: float
    response: str = ""


@dataclass(frozen=True)
class SpeakRequest:
    """TimeSpeak: the model was asked to say ``content`` at ``time`` seconds."""

    time: float
    content: str


@dataclass(frozen=True)
class RepetitionCount:
    """RepCount: the true number of repetitions and when the model was asked for it.

    The model's answer is read from its words at or after ``asked_at``.
    """

    count: int
    asked_at: float = 0.0


@dataclass(frozen=True)
class OverlapEvent:
    """A Full-Duplex-Bench v1.5 overlap: user speech (or noise) over ``[start, end]``.

    ``kind`` is one of :data:`OVERLAP_KINDS`. ``response_words`` are words whose
    presence in the model's post-overlap speech means it responded to the overlap's
    content (see :mod:`tml.eval.overlap`); empty means none is expected.
    """

    kind: str
    start: float
    end: float
    response_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Annotations:
    """What a scenario asked for. Every field is optional (empty or ``None``).

    ``turn_ends``
        Times the user's turns end, seconds. Full-Duplex-Bench smooth turn-taking
        reads the first one (its ``turn_taking.json`` ``timestamp[0]``).
    ``pauses``
        ``(start, end)`` of the user's within-turn pauses (``pause.json``).
    ``cues``, ``speak_requests``, ``repetitions``
        CueSpeak, TimeSpeak and RepCount targets (see :mod:`tml.eval.tasks`).
    ``overlaps``
        Overlap events (v1.5 scenarios, and the v1 user interruption, whose
        ``interrupt.json`` ``timestamp`` is an event of kind ``user_interruption``).
    ``backchannel_reference``
        Full-Duplex-Bench's reference backchannel-timing distribution for this
        sample (``icc_gt_distribution.json[sample]``), or ``None``.
    """

    turn_ends: tuple[float, ...] = ()
    pauses: tuple[Interval, ...] = ()
    cues: tuple[Cue, ...] = ()
    speak_requests: tuple[SpeakRequest, ...] = ()
    repetitions: RepetitionCount | None = None
    overlaps: tuple[OverlapEvent, ...] = ()
    backchannel_reference: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Timeline:
    """One conversation; see the module docstring for every field's meaning and units.

    Construction normalises sequences to tuples and numbers to ``float``/``bool`` and
    validates; invalid data raises :class:`TimelineError` naming the sample and field.
    """

    sample_id: str
    model_speaking: tuple[bool, ...]
    model_words: tuple[Word, ...] = ()
    user_segments: tuple[Interval, ...] = ()
    user_words: tuple[Word, ...] = ()
    control_tokens: tuple[ControlToken, ...] = ()
    annotations: Annotations = field(default_factory=Annotations)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.sample_id, str) or not self.sample_id:
            raise TimelineError(f"timeline sample_id must be a non-empty string, got {self.sample_id!r}")
        set_(self, "model_speaking", tuple(self._bools(self.model_speaking)))
        set_(self, "model_words", tuple(self._words("model_words", self.model_words)))
        set_(self, "user_segments", tuple(self._intervals("user_segments", self.user_segments)))
        set_(self, "user_words", tuple(self._words("user_words", self.user_words)))
        set_(self, "control_tokens", tuple(self._controls(self.control_tokens)))
        set_(self, "annotations", self._annotations(self.annotations))

    # ------------------------------------------------------------------ derived views
    @property
    def n_micro_turns(self) -> int:
        return len(self.model_speaking)

    @property
    def duration(self) -> float:
        """Conversation length in seconds, ``n_micro_turns / 5`` (correctly rounded)."""
        return self.n_micro_turns / MICRO_TURNS_PER_S

    def model_speech_segments(self) -> list[Interval]:
        """Runs of speaking micro-turns as ``(t0 / 5, t1 / 5)`` seconds, ``t1`` exclusive."""
        return _runs_to_segments(self.model_speaking)

    def micro_turn_at(self, time: float) -> int:
        """Index of the micro-turn containing ``time`` (a time within 1 ns of a boundary
        belongs to the later micro-turn), clipped to ``[0, n_micro_turns - 1]``."""
        t = math.floor(time * MICRO_TURNS_PER_S + BOUND_SLACK_S)
        return min(max(t, 0), self.n_micro_turns - 1)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, floats, strings) for ``json.dump``."""
        a = self.annotations
        return {
            "sample_id": self.sample_id,
            "model_speaking": [int(s) for s in self.model_speaking],
            "model_words": [_word_dict(w) for w in self.model_words],
            "user_segments": [list(s) for s in self.user_segments],
            "user_words": [_word_dict(w) for w in self.user_words],
            "control_tokens": [{"token": c.token, "time": c.time} for c in self.control_tokens],
            "annotations": {
                "turn_ends": list(a.turn_ends),
                "pauses": [list(p) for p in a.pauses],
                "cues": [{"word": c.word, "time": c.time, "response": c.response} for c in a.cues],
                "speak_requests": [{"time": r.time, "content": r.content} for r in a.speak_requests],
                "repetitions": None
                if a.repetitions is None
                else {"count": a.repetitions.count, "asked_at": a.repetitions.asked_at},
                "overlaps": [
                    {"kind": o.kind, "start": o.start, "end": o.end, "response_words": list(o.response_words)}
                    for o in a.overlaps
                ],
                "backchannel_reference": None
                if a.backchannel_reference is None
                else list(a.backchannel_reference),
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Timeline:
        """Inverse of :meth:`to_dict`; missing optional fields default to empty."""
        sid = d.get("sample_id", "<no sample_id>")
        known = {"sample_id", "model_speaking", "model_words", "user_segments", "user_words",
                 "control_tokens", "annotations"}
        unknown = set(d) - known
        if unknown:
            raise TimelineError(f"timeline {sid!r}: unknown fields {sorted(unknown)}; expected {sorted(known)}")
        if "model_speaking" not in d:
            raise TimelineError(f"timeline {sid!r}: field 'model_speaking' (one 0/1 per micro-turn) is required")
        a = d.get("annotations") or {}
        known_a = {"turn_ends", "pauses", "cues", "speak_requests", "repetitions", "overlaps",
                   "backchannel_reference"}
        unknown = set(a) - known_a
        if unknown:
            raise TimelineError(f"timeline {sid!r}: unknown annotations {sorted(unknown)}; expected {sorted(known_a)}")
        try:
            reps = a.get("repetitions")
            ann = Annotations(
                turn_ends=tuple(a.get("turn_ends", ())),
                pauses=tuple(tuple(p) for p in a.get("pauses", ())),
                cues=tuple(Cue(**c) for c in a.get("cues", ())),
                speak_requests=tuple(SpeakRequest(**r) for r in a.get("speak_requests", ())),
                repetitions=None if reps is None else RepetitionCount(**reps),
                overlaps=tuple(
                    OverlapEvent(o["kind"], o["start"], o["end"], tuple(o.get("response_words", ())))
                    for o in a.get("overlaps", ())
                ),
                backchannel_reference=None
                if a.get("backchannel_reference") is None
                else tuple(a["backchannel_reference"]),
            )
            return cls(
                sample_id=d["sample_id"],
                model_speaking=tuple(d["model_speaking"]),
                model_words=tuple(Word(**w) for w in d.get("model_words", ())),
                user_segments=tuple(tuple(s) for s in d.get("user_segments", ())),
                user_words=tuple(Word(**w) for w in d.get("user_words", ())),
                control_tokens=tuple(ControlToken(**c) for c in d.get("control_tokens", ())),
                annotations=ann,
            )
        except (TypeError, KeyError) as e:
            raise TimelineError(f"timeline {sid!r}: malformed field ({e}); see Timeline.to_dict for the layout") from e

    # ------------------------------------------------------------------ validation
    def _fail(self, field_name: str, msg: str) -> TimelineError:
        return TimelineError(f"timeline {self.sample_id!r}, field {field_name}: {msg}")

    def _time(self, field_name: str, value: Any, *, upper: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(field_name, f"time must be a number of seconds, got {value!r}")
        v = float(value)
        if not math.isfinite(v):
            raise self._fail(field_name, f"time must be finite, got {v}")
        if v < 0:
            raise self._fail(field_name, f"negative time {v} s; times count from the conversation start")
        upper = self.duration if upper is None else upper
        if v > upper:
            raise self._fail(
                field_name,
                f"time {v} s is after the conversation ends ({upper} s = {self.n_micro_turns} micro-turns "
                f"of {MICRO_TURN_S} s); extend model_speaking or fix the time",
            )
        return v

    def _bools(self, values: Sequence[Any]) -> list[bool]:
        if isinstance(values, (str, bytes)):
            raise TimelineError(f"timeline {self.sample_id!r}, field model_speaking: expected a sequence of bools")
        values = values.tolist() if hasattr(values, "tolist") else list(values)  # numpy arrays too
        if not values:
            raise TimelineError(
                f"timeline {self.sample_id!r}, field model_speaking: empty; it needs one entry per micro-turn"
            )
        for i, v in enumerate(values):
            if isinstance(v, str) or v not in (0, 1):
                raise TimelineError(
                    f"timeline {self.sample_id!r}, field model_speaking[{i}]: {v!r} is not a bool (or 0/1)"
                )
        return [bool(v) for v in values]

    def _intervals(self, field_name: str, values: Sequence[Any]) -> list[Interval]:
        out: list[Interval] = []
        for i, seg in enumerate(values):
            name = f"{field_name}[{i}]"
            if len(seg) != 2:
                raise self._fail(name, f"an interval is (start, end), got {seg!r}")
            s, e = self._time(name, seg[0]), self._time(name, seg[1])
            if not s < e:
                raise self._fail(name, f"start {s} must be < end {e}")
            if out and s < out[-1][1]:
                raise self._fail(
                    name,
                    f"starts at {s} s before the previous interval ends ({out[-1][1]} s); intervals must be "
                    "ordered and non-overlapping (merge overlapping ones first)",
                )
            out.append((s, e))
        return out

    def _words(self, field_name: str, values: Sequence[Any]) -> list[Word]:
        out: list[Word] = []
        for i, w in enumerate(values):
            name = f"{field_name}[{i}]"
            if not isinstance(w, Word):
                raise self._fail(name, f"expected a Word, got {type(w).__name__}")
            if not isinstance(w.text, str) or not w.text:
                raise self._fail(name, f"word text must be a non-empty string, got {w.text!r}")
            s, e = self._time(name, w.start), self._time(name, w.end)
            if s > e:
                raise self._fail(name, f"word {w.text!r} starts at {s} s after it ends ({e} s)")
            if out and s < out[-1].end:
                raise self._fail(
                    name,
                    f"word {w.text!r} starts at {s} s before the previous word {out[-1].text!r} ends "
                    f"({out[-1].end} s); words must be ordered by time and non-overlapping",
                )
            out.append(Word(w.text, s, e))
        return out

    def _controls(self, values: Sequence[Any]) -> list[ControlToken]:
        out: list[ControlToken] = []
        for i, c in enumerate(values):
            name = f"control_tokens[{i}]"
            if not isinstance(c, ControlToken):
                raise self._fail(name, f"expected a ControlToken, got {type(c).__name__}")
            if not (isinstance(c.token, str) and c.token.startswith("<") and c.token.endswith(">")):
                raise self._fail(name, f"control token must look like '<name>', got {c.token!r}")
            t = self._time(name, c.time)
            if out and t < out[-1].time:
                raise self._fail(name, f"time {t} s is before the previous control token's ({out[-1].time} s)")
            out.append(ControlToken(c.token, t))
        return out

    def _annotations(self, a: Any) -> Annotations:
        if not isinstance(a, Annotations):
            raise self._fail("annotations", f"expected Annotations, got {type(a).__name__}")
        turn_ends = tuple(self._time(f"annotations.turn_ends[{i}]", t) for i, t in enumerate(a.turn_ends))
        pauses = tuple(self._intervals("annotations.pauses", a.pauses))
        cues = []
        for i, c in enumerate(a.cues):
            if not isinstance(c.word, str) or not c.word:
                raise self._fail(f"annotations.cues[{i}]", f"cue word must be a non-empty string, got {c.word!r}")
            cues.append(Cue(c.word, self._time(f"annotations.cues[{i}]", c.time), str(c.response)))
        reqs = []
        for i, r in enumerate(a.speak_requests):
            if not isinstance(r.content, str) or not r.content.strip():
                raise self._fail(f"annotations.speak_requests[{i}]", "content (what to say) must be non-empty")
            reqs.append(SpeakRequest(self._time(f"annotations.speak_requests[{i}]", r.time), r.content))
        reps = a.repetitions
        if reps is not None:
            if isinstance(reps.count, bool) or not isinstance(reps.count, int) or reps.count < 1:
                raise self._fail("annotations.repetitions", f"count must be an integer >= 1, got {reps.count!r}")
            reps = RepetitionCount(reps.count, self._time("annotations.repetitions.asked_at", reps.asked_at))
        overlaps = []
        for i, o in enumerate(a.overlaps):
            name = f"annotations.overlaps[{i}]"
            if o.kind not in OVERLAP_KINDS:
                raise self._fail(name, f"kind {o.kind!r} is not one of {OVERLAP_KINDS}")
            s, e = self._time(name, o.start), self._time(name, o.end)
            if not s < e:
                raise self._fail(name, f"start {s} must be < end {e}")
            overlaps.append(OverlapEvent(o.kind, s, e, tuple(str(w) for w in o.response_words)))
        ref = a.backchannel_reference
        if ref is not None:
            ref = tuple(float(x) for x in ref)
            if len(ref) < 2 or any(not math.isfinite(x) or x < 0 for x in ref):
                raise self._fail(
                    "annotations.backchannel_reference",
                    "needs >= 2 finite non-negative values (a histogram over the conversation)",
                )
        return Annotations(turn_ends, pauses, tuple(cues), tuple(reqs), reps, tuple(overlaps), ref)


def _word_dict(w: Word) -> dict[str, Any]:
    return {"text": w.text, "start": w.start, "end": w.end}


def _runs_to_segments(active: Sequence[bool]) -> list[Interval]:
    segs: list[Interval] = []
    start = None
    for t, a in enumerate(active):
        if a and start is None:
            start = t
        elif not a and start is not None:
            segs.append((start / MICRO_TURNS_PER_S, t / MICRO_TURNS_PER_S))
            start = None
    if start is not None:
        segs.append((start / MICRO_TURNS_PER_S, len(active) / MICRO_TURNS_PER_S))
    return segs
