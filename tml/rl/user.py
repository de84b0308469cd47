"""A reacting user for minutes-long episodes: scenario conversations played back to back,
the user stopping when the model talks over them and asking an ignored question again.

A :class:`LongScript` is ``K`` generated conversations of one scenario (``segments``,
:func:`tml.rl.episodes.long_script`) separated by ``gap`` micro-turns of room noise,
hundreds of micro-turns in all. A :class:`ReactiveUser` plays it one micro-turn at a time
as a :class:`tml.sampler.scripted.UserSide`: the input of micro-turn ``t + 1`` is decided
from the engine's output of micro-turn ``t`` (never later ones), by two rules
(:class:`Reactions`):

* **an interrupted user stops**: when the model speaks (speech frames) in
  ``stop_after`` consecutive micro-turns while a user utterance is going on and goes on
  past that micro-turn, the rest of that utterance is not said: its remaining samples
  are replaced by a low noise floor (other sounds in those micro-turns, and typed /
  background text and video, stay);
* **an ignored question is asked again**: a user utterance that a smooth-turn-taking
  task refers to (its ``turn_ends``) and that starts with a question word
  (:data:`QUESTION_WORDS`), when the model has produced no
  speech and no text for ``repeat_after_s`` seconds from the micro-turn that question
  ends in, is said again (its micro-turns replayed) before the script goes on, at most
  ``max_repeats`` times; the rest of the segment comes that much later.

:meth:`ReactiveUser.reference` is the :class:`~tml.eval.scenarios.Reference` of what was
actually played: every segment's tasks at their realised micro-turns (annotation times
moved with them), the user's realised utterances and words (cut ones cut), and, for a
repeated question, its task split in two — the first ask's window up to the repeat
(scored as it was: ignored), the repeat's window from there with ``turn_ends`` at the
repeat's end. The eval scorers score it unchanged. ``reactions`` lists every reaction
(kind, micro-turn, segment); the reference's ``meta["task_keys"]`` names each task by
(segment, task of the segment, repeat), the same across a group's episodes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from tml.eval.scenarios import Reference, Task, _merged
from tml.eval.timeline import MICRO_TURNS_PER_S, Annotations, Word
from tml.sampler.session import TurnInputs

SAMPLES_PER_MT = 3200
QUESTION_WORDS = frozenset({"what", "how", "why", "where", "when", "who", "which", "can", "could", "do", "does",
                            "did", "should", "is", "are", "will", "would"})
"""A turn the user takes is a question when its first word is one of these (the scenario
generator's questions are; its closing thanks are not: the meta's utterance texts carry
no punctuation)."""
NOISE_RMS = 5e-4   # the cut part of an utterance: room noise at the generator's floor (2e-4 .. 1.5e-3)


@dataclass(frozen=True)
class Reactions:
    """How the user reacts (``rl.user_*``). ``stop_after`` 0 or ``repeat_after_s`` 0 turns
    that rule off."""

    stop_after: int = 2            # micro-turns of the model speaking over an utterance before the user stops
    repeat_after_s: float = 2.0    # an ignored question is asked again after this silence (s)
    max_repeats: int = 1           # per question


@dataclass
class Segment:
    """One conversation of a long script: its reference and inputs (local micro-turns
    ``0 .. n-1``), its user utterances ``(start, end)`` s and the utterances that are
    questions (``utterance index -> task index`` of the turn task that refers to it)."""

    ref: Reference
    inputs: list[TurnInputs]
    utterances: list[tuple[float, float]]
    questions: dict[int, int]

    @property
    def n(self) -> int:
        return len(self.inputs)


def segment_of(ref: Reference, inputs: list[TurnInputs]) -> Segment:
    """A prepared conversation (:func:`tml.eval.run.prepare`'s reference and inputs) → a Segment."""
    utts = [(float(a), float(b), str(text)) for sp, a, b, text in ref.meta.get("utterances", ()) if sp == "user"]
    questions = {}
    for j, task in enumerate(ref.tasks):
        if task.name != "smooth_turn_taking" or not task.annotations.turn_ends:
            continue
        te = task.annotations.turn_ends[0]
        for i, (_, b, text) in enumerate(utts):
            if abs(b - te) < 1e-6 and text.split()[:1] and text.split()[0].lower() in QUESTION_WORDS:
                questions[i] = j
    return Segment(ref, list(inputs), [(a, b) for a, b, _ in utts], questions)


@dataclass
class LongScript:
    """A minutes-long episode's plan: segments of one scenario, ``gap`` noise micro-turns
    between them (shared by a group's episodes; each plays it with its own user)."""

    name: str
    scenario: str
    segments: list[Segment]
    gap: int = 5

    @property
    def n_micro_turns(self) -> int:
        """Micro-turns without reactions (a repeat adds some)."""
        return sum(s.n for s in self.segments) + self.gap * (len(self.segments) - 1)

    def max_micro_turns(self, reactions: Reactions) -> int:
        """Micro-turns with every question repeated as often as allowed."""
        extra = 0
        if reactions.repeat_after_s > 0:
            for s in self.segments:
                for i in s.questions:
                    a, b = s.utterances[i]
                    extra += reactions.max_repeats * (_mt(b) - _mt(a) + 1)
        return self.n_micro_turns + extra


def _mt(time: float) -> int:
    return math.floor(time * MICRO_TURNS_PER_S + 1e-9)


def _spoke(output) -> bool:
    return len(output.speech) > 0


def _responded(output) -> bool:
    return len(output.speech) > 0 or len(output.text_bytes) > 0


@dataclass
class _Item:
    kind: str          # "seg" (a segment's micro-turn) or "gap"
    k: int = -1        # segment
    tau: int = -1      # the segment micro-turn whose inputs are played
    inst: int = 0      # 0: the segment's own micro-turn; r >= 1: the r-th repeat of question q
    q: int = -1        # the repeated question's utterance index (inst >= 1)


@dataclass
class _Repeat:
    k: int
    q: int             # utterance index
    task: int          # its turn task
    inst: int
    start: int         # first global micro-turn of the repeat
    end: int           # global micro-turn after its last


class ReactiveUser:
    """Plays a :class:`LongScript` (module docstring); ``seed`` keys the noise of cuts."""

    def __init__(self, script: LongScript, reactions: Reactions = Reactions(), seed: int = 0):
        if not script.segments:
            raise ValueError(f"{script.name}: a long script needs at least one segment")
        self.script, self.rules, self.seed = script, reactions, seed
        self.queue: list[_Item] = []
        for k, s in enumerate(script.segments):
            if k:
                self.queue += [_Item("gap")] * script.gap
            self.queue += [_Item("seg", k, tau) for tau in range(s.n)]
        self.played: list[_Item] = []
        self.cuts: dict[tuple[int, int, int], float] = {}   # (segment, inst, utterance) -> cut time (local s)
        self.overlap: dict[tuple[int, int, int], int] = {}  # consecutive micro-turns spoken over
        self.repeats: list[_Repeat] = []
        self.responded: list[bool] = []                     # per played micro-turn: the model spoke or wrote
        self.reactions: list[dict] = []

    # ---------------------------------------------------------------- playing
    def first(self) -> TurnInputs:
        return self._play()

    def next(self, output) -> TurnInputs | None:
        self._react(self.played[-1], len(self.played) - 1, output)
        if not self.queue:
            return None
        self._maybe_repeat(len(self.played))
        return self._play()

    def _play(self) -> TurnInputs:
        item = self.queue.pop(0)
        self.played.append(item)
        if item.kind == "gap":
            return TurnInputs(audio=self._noise(len(self.played), 0, SAMPLES_PER_MT))
        x = self.script.segments[item.k].inputs[item.tau]
        audio = np.array(x.audio, np.float32, copy=True)
        lo, hi = item.tau / MICRO_TURNS_PER_S, (item.tau + 1) / MICRO_TURNS_PER_S
        for (k, inst, u), cut in self.cuts.items():
            if k != item.k or inst != item.inst:
                continue
            end = self.script.segments[k].utterances[u][1]
            a, b = max(cut, lo), min(end, hi)
            if b > a:
                s0, s1 = round((a - lo) * 16000), round((b - lo) * 16000)
                audio[s0:s1] = self._noise(len(self.played), s0, s1 - s0)
        return dataclasses.replace(x, audio=audio)

    def _noise(self, t: int, offset: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, t, offset])
        return (rng.standard_normal(n) * NOISE_RMS).astype(np.float32)

    def _utterance_at(self, item: _Item) -> int | None:
        """The user utterance of ``item``'s segment sounding in its micro-turn and going on after it."""
        seg = self.script.segments[item.k]
        lo, hi = item.tau / MICRO_TURNS_PER_S, (item.tau + 1) / MICRO_TURNS_PER_S
        for u, (a, b) in enumerate(seg.utterances):
            if item.inst and u != item.q:
                continue
            cut = self.cuts.get((item.k, item.inst, u), math.inf)
            if a < hi and min(b, cut) > hi + 1e-9 and b > lo:
                return u
        return None

    def _react(self, item: _Item, t: int, output) -> None:
        self.responded.append(_responded(output))
        if item.kind != "seg" or not self.rules.stop_after:
            return
        seg = self.script.segments[item.k]
        u = self._utterance_at(item)
        key = (item.k, item.inst, u)
        if u is None or not _spoke(output):
            self.overlap = {}
            return
        self.overlap = {key: self.overlap.get(key, 0) + 1}
        if self.overlap[key] >= self.rules.stop_after:
            cut = (item.tau + 1) / MICRO_TURNS_PER_S
            self.cuts[key] = cut
            self.overlap = {}
            self.reactions.append({"kind": "stopped", "micro_turn": t + 1, "segment": item.k, "utterance": u,
                                   "repeat": item.inst, "unsaid_s": round(seg.utterances[u][1] - cut, 3)})

    def _maybe_repeat(self, t: int) -> None:
        """Before playing global micro-turn ``t``: repeat a question the model has neither
        spoken nor written anything after for ``repeat_after_s`` (from the micro-turn it
        ended in), while the script is still in that question's turn window."""
        nxt = self.queue[0]
        if not self.rules.repeat_after_s or nxt.kind != "seg" or nxt.inst:
            return
        seg = self.script.segments[nxt.k]
        wait = round(self.rules.repeat_after_s * MICRO_TURNS_PER_S)
        for q, j in seg.questions.items():
            a, b = seg.utterances[q]
            done = [r for r in self.repeats if r.k == nxt.k and r.q == q]
            if (nxt.k, 0, q) in self.cuts or len(done) >= self.rules.max_repeats or nxt.tau >= seg.ref.tasks[j].t1:
                continue
            if done:
                ended = done[-1].end - 1
            else:
                ended = next((i for i, it in enumerate(self.played)
                              if it.kind == "seg" and it.inst == 0 and it.k == nxt.k and it.tau == _mt(b)), None)
            if ended is None or t - ended < wait or any(self.responded[ended:t]):
                continue
            inst = len(done) + 1
            taus = range(_mt(a), _mt(b) + 1)
            self.queue[:0] = [_Item("seg", nxt.k, tau, inst, q) for tau in taus]
            self.repeats.append(_Repeat(nxt.k, q, j, inst, t, t + len(taus)))
            self.reactions.append({"kind": "repeated", "micro_turn": t, "segment": nxt.k, "utterance": q,
                                   "repeat": inst})
            return

    # ---------------------------------------------------------------- the realised reference
    def reference(self) -> Reference:
        """What was played, as a Reference (module docstring). Call after the last micro-turn."""
        if self.queue:
            raise RuntimeError(f"{self.script.name}: the episode is not over ({len(self.queue)} micro-turns left)")
        segs = self.script.segments
        where: dict[tuple[int, int], int] = {}          # (segment, tau) of the segment's own micro-turns -> global
        for t, it in enumerate(self.played):
            if it.kind == "seg" and it.inst == 0:
                where[(it.k, it.tau)] = t

        def g(k: int, tau: int) -> int:
            return where[(k, tau)] if tau < segs[k].n else where[(k, segs[k].n - 1)] + 1

        def gt(k: int, x: float) -> float:              # a local time of segment k -> global seconds
            m = min(_mt(x), segs[k].n)
            return g(k, m) / MICRO_TURNS_PER_S + (x - m / MICRO_TURNS_PER_S)

        spans: list[tuple[float, float]] = []
        words: list[Word] = []
        tasks: list[tuple[tuple[int, int, int], Task]] = []   # ((segment, task, repeat), task)

        def place(k: int, u: int, inst: int, start_of) -> None:
            a, b = segs[k].utterances[u]
            stop = min(b, self.cuts.get((k, inst, u), math.inf))
            spans.append((start_of(a), start_of(stop)))
            for w in segs[k].ref.user_words:
                if a - 1e-6 <= w.start < stop and w.end <= b + 1e-6:
                    words.append(Word(w.text, start_of(w.start), start_of(min(w.end, stop))))

        for k, s in enumerate(segs):
            for u in range(len(s.utterances)):
                place(k, u, 0, lambda x, k=k: gt(k, x))
            for j, task in enumerate(s.ref.tasks):
                ann = map_annotations(task.annotations, lambda x, k=k: gt(k, x))
                t0, t1 = g(k, task.t0), g(k, task.t1)
                reps = [r for r in self.repeats if r.k == k and r.task == j]
                if not reps:
                    tasks.append(((k, j, 0), dataclasses.replace(task, t0=t0, t1=t1, annotations=ann)))
                    continue
                bounds = [t0] + [r.start for r in reps] + [t1]
                tasks.append(((k, j, 0), dataclasses.replace(task, t0=bounds[0], t1=bounds[1], annotations=ann)))
                for r, lo, hi in zip(reps, bounds[1:], bounds[2:]):
                    q0 = _mt(s.utterances[r.q][0]) / MICRO_TURNS_PER_S
                    shift = r.start / MICRO_TURNS_PER_S - q0
                    te = task.annotations.turn_ends[0] + shift
                    tasks.append(((k, j, r.inst),
                                  dataclasses.replace(task, t0=lo, t1=hi, annotations=Annotations(turn_ends=(te,)))))
                    place(k, r.q, r.inst, lambda x, shift=shift: x + shift)
        words.sort(key=lambda w: w.start)
        n = len(self.played)
        sc = self.script
        tasks.sort(key=lambda x: (x[1].t0, x[1].t1, x[0]))
        meta = {"segments": [s.ref.sample_id for s in sc.segments], "reactions": list(self.reactions),
                "task_keys": [key for key, _ in tasks]}
        return Reference(sc.name, sc.scenario, n, tuple(_merged(spans)), tuple(words),
                         tuple(t for _, t in tasks), meta)


def map_annotations(a: Annotations, f) -> Annotations:
    """Every time of ``a`` through ``f`` (seconds → seconds)."""
    return Annotations(
        turn_ends=tuple(f(t) for t in a.turn_ends),
        pauses=tuple((f(p), f(q)) for p, q in a.pauses),
        cues=tuple(dataclasses.replace(c, time=f(c.time)) for c in a.cues),
        speak_requests=tuple(dataclasses.replace(r, time=f(r.time)) for r in a.speak_requests),
        repetitions=None if a.repetitions is None else dataclasses.replace(a.repetitions,
                                                                           asked_at=f(a.repetitions.asked_at)),
        overlaps=tuple(dataclasses.replace(o, start=f(o.start), end=f(o.end)) for o in a.overlaps),
        backchannel_reference=a.backchannel_reference,
    )


@dataclass
class LongEpisode:
    """One episode of a group: a script, its sampling seed and reactions. ``user_side()``
    gives the scripted loop a fresh :class:`ReactiveUser` (kept as ``user``, whose
    :meth:`~ReactiveUser.reference` the rewards are scored on)."""

    name: str
    seed: int
    script: LongScript
    reactions: Reactions = field(default_factory=Reactions)
    user: ReactiveUser | None = None

    def user_side(self) -> ReactiveUser:
        self.user = ReactiveUser(self.script, self.reactions, self.seed)
        return self.user


__all__ = ["LongEpisode", "LongScript", "Reactions", "ReactiveUser", "Segment", "map_annotations", "segment_of"]
