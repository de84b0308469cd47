"""TimeSpeak, CueSpeak and RepCount-style scorers: timing *and* content, by stated rules.

All three read the model's words (``Timeline.model_words``) and compare content after
:func:`~tml.eval.overlap.normalise` (lower case, punctuation stripped).

Content rule (TimeSpeak, CueSpeak)
----------------------------------
The expected content's ``k`` words must occur **in order** (a subsequence) among the
first ``2 k`` model words from the response onset: fillers are tolerated, paraphrase
and missing words are not.

TimeSpeak (:func:`time_speak`)
------------------------------
For each :class:`~tml.eval.timeline.SpeakRequest` ``(time, content)``: the attempt is
the first model word starting at or after ``time - tolerance`` (speech earlier than
that is not an attempt at this request). ``timing_error = onset - time`` (signed,
seconds); on time iff ``|timing_error| <= tolerance`` (default
:data:`TIMESPEAK_TOLERANCE_S` = 0.4 s, two micro-turns, so speaking one micro-turn
early or late is on time). ``correct`` iff on time **and** the content rule holds.
Per conversation: ``accuracy`` = fraction of requests correct, ``timing_error`` = mean
absolute error over requests with an attempt (None if none). Credit: +1 on the onset
micro-turn of each correct attempt, -1 on the onset of a wrong one (on the requested
micro-turn if there was no attempt).

CueSpeak (:func:`cue_speak`)
----------------------------
For each :class:`~tml.eval.timeline.Cue` ``(word, time, response)``: the response is
the first model word starting at or after the cue ``time`` (the end of the user's cue
word). ``latency = onset - time``; ``correct`` iff ``latency <= deadline`` (default
:data:`CUESPEAK_DEADLINE_S` = 1.0 s) and, when ``response`` is given, the content rule
holds. Per conversation: ``accuracy`` and mean ``latency`` over cues answered at all.
Credit as for TimeSpeak.

Every bound above is inclusive, with ``BOUND_SLACK_S`` (1 ns, ``tml.eval.timeline``) of
slack, so float rounding (``4.4 - 4.0 = 0.40000000000000036``) does not push a response
that is exactly at a bound outside it.

RepCount (:func:`rep_count`)
----------------------------
The model's count is the **last** number it says at or after
``repetitions.asked_at`` (digits, or English number words up to ninety-nine, e.g.
``"twelve"``, ``"twenty-one"``, ``"twenty one"``); saying no number counts as 0. Metrics
as RepCount-A reports them (Hu et al., "TransRAC: Encoding Multi-scale Temporal
Correlation with Transformers for Repetitive Action Counting", CVPR 2022, the paper
that introduced RepCount-A): per sample ``abs_error = |pred - gt|``,
``normalized_error = |pred - gt| / gt`` (its MAE is the mean of this: an error
normalised by the ground-truth count) and ``obo = |pred - gt| <= 1`` (off-by-one
accuracy is the mean of this). The released TransRAC test code
(github.com/SvipRepetitionCounting/TransRAC ``testing/test_looping.py``) divides by
``gt + 0.1`` instead of ``gt``; pass ``denominator_offset=0.1`` to reproduce it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tml.eval.overlap import normalise
from tml.eval.timeline import BOUND_SLACK_S, Timeline, Word

TIMESPEAK_TOLERANCE_S = 0.4
"""TimeSpeak: speaking within this many seconds of the requested time is on time."""
CUESPEAK_DEADLINE_S = 1.0
"""CueSpeak: the answer must start within this many seconds after the cue."""


def content_matches(said: Sequence[Word], expected: str) -> bool:
    """The content rule: ``expected``'s words in order within the first 2k of ``said``."""
    want = [t for t in (normalise(x) for x in expected.split()) if t]
    if not want:
        return True
    got = [normalise(w.text) for w in said[: 2 * len(want)]]
    i = 0
    for g in got:
        if i < len(want) and g == want[i]:
            i += 1
    return i == len(want)


def _first_word_from(words: Sequence[Word], t: float) -> int | None:
    return next((i for i, w in enumerate(words) if w.start >= t), None)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def time_speak(tl: Timeline, tolerance: float = TIMESPEAK_TOLERANCE_S) -> dict[str, Any]:
    """TimeSpeak (module docstring): ``{"accuracy", "timing_error", "requests": [...], "credit"}``."""
    reqs = tl.annotations.speak_requests
    if not reqs:
        raise ValueError(f"timeline {tl.sample_id!r}: TimeSpeak needs annotations.speak_requests (time, content)")
    words, credit, per = tl.model_words, [0.0] * tl.n_micro_turns, []
    for r in reqs:
        i = _first_word_from(words, r.time - tolerance - BOUND_SLACK_S)
        if i is None:
            per.append({"time": r.time, "onset": None, "timing_error": None, "on_time": False,
                        "content_ok": False, "correct": False})
            credit[tl.micro_turn_at(r.time)] -= 1.0
            continue
        err = words[i].start - r.time
        on_time, content_ok = abs(err) <= tolerance + BOUND_SLACK_S, content_matches(words[i:], r.content)
        correct = on_time and content_ok
        per.append({"time": r.time, "onset": words[i].start, "timing_error": err, "on_time": on_time,
                    "content_ok": content_ok, "correct": correct})
        credit[tl.micro_turn_at(words[i].start)] += 1.0 if correct else -1.0
    return {
        "accuracy": sum(p["correct"] for p in per) / len(per),
        "timing_error": _mean([abs(p["timing_error"]) for p in per if p["timing_error"] is not None]),
        "requests": per,
        "credit": credit,
    }


def cue_speak(tl: Timeline, deadline: float = CUESPEAK_DEADLINE_S) -> dict[str, Any]:
    """CueSpeak (module docstring): ``{"accuracy", "latency", "cues": [...], "credit"}``."""
    cues = tl.annotations.cues
    if not cues:
        raise ValueError(f"timeline {tl.sample_id!r}: CueSpeak needs annotations.cues (word, time, response)")
    words, credit, per = tl.model_words, [0.0] * tl.n_micro_turns, []
    for c in cues:
        i = _first_word_from(words, c.time)
        if i is None:
            per.append({"word": c.word, "latency": None, "in_time": False, "content_ok": False, "correct": False})
            credit[tl.micro_turn_at(c.time)] -= 1.0
            continue
        latency = words[i].start - c.time
        in_time = latency <= deadline + BOUND_SLACK_S
        content_ok = content_matches(words[i:], c.response)
        correct = in_time and content_ok
        per.append({"word": c.word, "latency": latency, "in_time": in_time, "content_ok": content_ok,
                    "correct": correct})
        credit[tl.micro_turn_at(words[i].start)] += 1.0 if correct else -1.0
    return {
        "accuracy": sum(p["correct"] for p in per) / len(per),
        "latency": _mean([p["latency"] for p in per if p["latency"] is not None]),
        "cues": per,
        "credit": credit,
    }


_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_DIGITS = re.compile(r"^\d+$")


def spoken_numbers(words: Sequence[Word]) -> list[int]:
    """Numbers said in ``words``, in order (digits, number words, "twenty one", "twenty-one")."""
    tokens = []
    for w in words:
        tokens.extend(t for t in normalise(w.text.replace("-", " ")).split() if t)
    out: list[int] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if _DIGITS.match(t):
            out.append(int(t))
        elif t in _UNITS:
            out.append(_UNITS[t])
        elif t in _TENS:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            if nxt in _UNITS and 0 < _UNITS[nxt] < 10:
                out.append(_TENS[t] + _UNITS[nxt])
                i += 1
            else:
                out.append(_TENS[t])
        i += 1
    return out


def rep_count(tl: Timeline, denominator_offset: float = 0.0) -> dict[str, Any]:
    """RepCount (module docstring): ``{"predicted", "count", "abs_error", "normalized_error", "obo"}``."""
    reps = tl.annotations.repetitions
    if reps is None:
        raise ValueError(f"timeline {tl.sample_id!r}: RepCount needs annotations.repetitions (count, asked_at)")
    numbers = spoken_numbers([w for w in tl.model_words if w.start >= reps.asked_at])
    pred = numbers[-1] if numbers else 0
    err = abs(pred - reps.count)
    return {"predicted": pred, "count": reps.count, "abs_error": err,
            "normalized_error": err / (reps.count + denominator_offset), "obo": err <= 1}
