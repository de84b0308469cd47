"""Full-Duplex-Bench v1 metrics, defined exactly as its scoring scripts define them.

Source read (not copied): github.com/DanielLin94144/Full-Duplex-Bench at commit
``d7336bda1385872b83b48a8d45d9c0003836a60d``, ``v1_v1.5/evaluation/eval_pause_handling.py``,
``eval_smooth_turn_taking.py``, ``eval_user_interruption.py``, ``eval_backchannel.py`` and
``v1_v1.5/get_transcript/asr.py``. ``tests/eval/test_fdb_parity.py`` checks these
functions against that code's outputs on hand-made samples (fixtures recorded by
``tests/eval/fixtures/fdb_v1/generate.py``).

What FD-bench scores, and how a :class:`~tml.eval.timeline.Timeline` maps onto it
-------------------------------------------------------------------------------
FD-bench runs ASR (word-level timestamps) on the model's output audio and reads its
``chunks``; one chunk is one "word" (fillers like ``[UH]`` and punctuation-only chunks
count). tml reads ``Timeline.model_words`` in their place.

**Take-turn rule (TOR)**, :func:`took_turn`, shared by pause handling, smooth
turn-taking and user interruption: no words -> 0; otherwise
``duration = words[-1].end - words[0].start`` (last word's end minus first word's
start, not the speech-activity span); ``duration < 1.0`` s (strict: exactly 1.0 s is
a turn) with ``<= 3`` words -> 0; otherwise 1. Four words inside 1 s are a turn.

**Latency** (smooth turn-taking, user interruption): ``words[0].start - t_ref``,
clipped at 0, only when TOR = 1; a sample with TOR = 0 has no latency and the task
average skips it (FD-bench's average divides by the number of TOR = 1 samples).
``t_ref`` is ``turn_taking.json[0].timestamp[0]`` for smooth turn-taking
(``annotations.turn_ends[0]``) and ``interrupt.json[0].timestamp[1]`` -- the end of the
interruption -- for user interruption (the end of the first ``user_interruption``
overlap event).

**Pause handling**: TOR over *all* of the model's words (FD-bench transcribes the whole
output); TOR = 1 means the model wrongly took the turn during the user's pause, so
lower is better.

**User interruption**: FD-bench crops the output audio at the interruption end before
ASR and adds the offset back (``asr.py``, task ``user_interruption``), so only speech
after the interruption is scored. tml keeps the words that *start* at or after the
interruption end (a word straddling the crop is dropped: the ASR of a cropped fragment
is not a reliable word). The GPT-4 relevance rating FD-bench also reports is an LLM
judgement and is not reproduced here.

**Backchannel** (:func:`backchannel`): FD-bench runs Silero VAD on the output audio;
tml uses the model's own speech activity, ``Timeline.model_speech_segments()`` (runs
of speaking micro-turns; Silero's 30 ms padding, 100 ms gap merging and 0.1 s rounding
do not apply). Walking the segments in order, with ``TOR = 0`` to start:

* a segment longer than 3 s (strict) -> TOR = 1 and **stop** (that segment and all
  later ones are not backchannels);
* otherwise the segment's words are the model words that lie inside it
  (``w.start >= s and w.end <= e``), straddle its end (``w.start <= e < w.end``) or
  straddle its start (``w.start <= s < w.end``); TOR for this segment is 1 if it has
  more than 3 words, else 0 if it is shorter than 1 s with at most 2 words, else 1.
  **Each segment overwrites TOR** (the sample's TOR is the last examined segment's),
  and every examined segment -- even one with TOR = 1 -- is recorded as a
  backchannel.

Frequency = number of recorded backchannels / conversation duration (s). JSD: the
conversation is cut into ``int(duration / 0.2) + 1`` windows of 0.2 s; each
backchannel adds 1 to windows ``int(s / 0.2)`` .. ``int(e / 0.2)`` inclusive (those
that exist); the histogram plus 1e-10 is normalised; the reference distribution is
resampled to the same length by linear interpolation over ``[0, 1]``; the score is
``scipy.spatial.distance.jensenshannon`` (natural log) -- the Jensen-Shannon
*distance*, the square root of the divergence, which FD-bench reports as "JSD". With
no backchannel it is 1. The ``int(x / 0.2)`` binning is kept verbatim, floating-point
quirks included (``0.6 / 0.2 = 2.9999999999999996`` falls in window 2).

The reference distribution FD-bench uses is ``v1_v1.5/evaluation/icc_gt_distribution.json``
(one histogram per ICC sample, keyed by sample folder name); see
:data:`ICC_REFERENCE_SOURCE` and :func:`load_backchannel_reference`. It is not vendored
here: it is derived from the ICC corpus and released under CC BY-NC 4.0.

Per-micro-turn credit
---------------------
Turn-taking scorers also return ``credit``: one float per micro-turn saying which
micro-turns earned or cost the score (for RL). See each function.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon

from tml.eval.timeline import MICRO_TURN_S, Timeline, Word

TURN_DURATION_THRESHOLD_S = 1.0
"""A response spanning less than this (strictly) is a turn only with more than 3 words."""
TURN_MAX_WORDS_WITHOUT_TURN = 3
"""At most this many words within the duration threshold are not a turn."""
BACKCHANNEL_MAX_SEGMENT_S = 3.0
"""A model speech segment longer than this (strictly) is formal speaking, not a backchannel."""
BACKCHANNEL_MAX_WORDS = 2
"""A segment shorter than 1 s with at most this many words is a backchannel (TOR 0)."""
JSD_WINDOW_S = 0.2
"""Width of the backchannel-timing histogram's windows, seconds."""
JSD_EPSILON = 1e-10
"""Added to every histogram window before normalising."""

ICC_REFERENCE_SOURCE = {
    "repository": "https://github.com/DanielLin94144/Full-Duplex-Bench",
    "commit": "d7336bda1385872b83b48a8d45d9c0003836a60d",
    "path": "v1_v1.5/evaluation/icc_gt_distribution.json",
    "sha256": "92bcd0ff27246aaa9a0136737b476afd456cd393f003944c3394c140e590f2a8",
    "samples": 55,
    "license": "CC BY-NC 4.0 (derived from the ICC corpus)",
}
"""Where FD-bench's backchannel reference distribution lives; it is not shipped with tml."""


# ---------------------------------------------------------------------------- TOR
def took_turn(words: Sequence[Word]) -> int:
    """FD-bench's take-turn rule: 1 if ``words`` make a turn, else 0 (module docstring)."""
    if not words:
        return 0
    duration = words[-1].end - words[0].start
    if duration < TURN_DURATION_THRESHOLD_S and len(words) <= TURN_MAX_WORDS_WITHOUT_TURN:
        return 0
    return 1


def _latency(words: Sequence[Word], t_ref: float) -> float:
    return max(words[0].start - t_ref, 0.0)


def _turn_credit(tl: Timeline, words: Sequence[Word], tor: int, t_ref: float) -> list[float]:
    """+1 on the micro-turn the response starts in, and -0.2 (its share of the latency)
    on every micro-turn from ``t_ref``'s up to it; -1 on ``t_ref``'s micro-turn if no turn."""
    credit = [0.0] * tl.n_micro_turns
    ref_t = tl.micro_turn_at(t_ref)
    if not tor:
        credit[ref_t] = -1.0
        return credit
    onset = tl.micro_turn_at(words[0].start)
    for t in range(ref_t, onset):
        credit[t] = -MICRO_TURN_S
    credit[onset] += 1.0
    return credit


# ---------------------------------------------------------------------------- tasks
def pause_handling(tl: Timeline) -> dict[str, Any]:
    """Pause handling: ``{"tor": 0|1, "credit": [...]}`` (TOR over all model words).

    TOR = 1 is the failure (the model took the turn in the user's pause); ``credit`` is
    -1 on the micro-turn each word starts in when TOR = 1, else all 0.
    """
    tor = took_turn(tl.model_words)
    credit = [0.0] * tl.n_micro_turns
    if tor:
        for w in tl.model_words:
            credit[tl.micro_turn_at(w.start)] = -1.0
    return {"tor": tor, "credit": credit}


def smooth_turn_taking(tl: Timeline) -> dict[str, Any]:
    """Smooth turn-taking: ``{"tor", "latency" (s, None if TOR 0), "credit"}``.

    Reference time: ``annotations.turn_ends[0]``. Credit: see :func:`_turn_credit`.
    """
    if not tl.annotations.turn_ends:
        raise ValueError(
            f"timeline {tl.sample_id!r}: smooth turn-taking needs annotations.turn_ends "
            "(the user's turn end, FD-bench turn_taking.json timestamp[0])"
        )
    t_ref = tl.annotations.turn_ends[0]
    words = tl.model_words
    tor = took_turn(words)
    return {
        "tor": tor,
        "latency": _latency(words, t_ref) if tor else None,
        "credit": _turn_credit(tl, words, tor, t_ref),
    }


def interruption_end(tl: Timeline) -> float:
    """End time of the first ``user_interruption`` overlap event (``interrupt.json`` timestamp[1])."""
    for o in tl.annotations.overlaps:
        if o.kind == "user_interruption":
            return o.end
    raise ValueError(
        f"timeline {tl.sample_id!r}: user interruption needs an annotations.overlaps event of kind "
        "'user_interruption' (FD-bench interrupt.json timestamp [start, end])"
    )


def user_interruption(tl: Timeline) -> dict[str, Any]:
    """User interruption (v1): ``{"tor", "latency" (s, None if TOR 0), "credit"}``.

    Only model words starting at or after the interruption end are scored (FD-bench
    crops the output there before ASR); latency is measured from that end.
    """
    t_ref = interruption_end(tl)
    words = [w for w in tl.model_words if w.start >= t_ref]
    tor = took_turn(words)
    return {
        "tor": tor,
        "latency": _latency(words, t_ref) if tor else None,
        "credit": _turn_credit(tl, words, tor, t_ref),
    }


def _words_touching(words: Sequence[Word], s: float, e: float) -> list[Word]:
    """Words inside ``[s, e]``, straddling ``e`` (``start <= e < end``) or straddling
    ``s`` (``start <= s < end``) -- FD-bench's three cases, bounds as it has them."""
    return [
        w for w in words
        if (w.start >= s and w.end <= e) or (w.start <= e and w.end > e) or (w.start <= s and w.end > s)
    ]


def backchannel(tl: Timeline, reference: Sequence[float] | None = None) -> dict[str, Any]:
    """Backchannel: ``{"tor", "frequency" (1/s), "jsd", "backchannels": [(s, e), ...]}``.

    ``reference``: FD-bench's reference timing histogram for this sample; defaults to
    ``annotations.backchannel_reference``. It is needed only when the model produced
    at least one backchannel (otherwise JSD is 1 by definition).
    """
    tor = 0
    found: list[tuple[float, float]] = []
    for s, e in tl.model_speech_segments():
        duration = e - s
        if duration > BACKCHANNEL_MAX_SEGMENT_S:
            tor = 1
            break
        n_words = len(_words_touching(tl.model_words, s, e))
        if n_words > TURN_MAX_WORDS_WITHOUT_TURN:
            tor = 1
        elif duration < TURN_DURATION_THRESHOLD_S:
            tor = 0 if n_words <= BACKCHANNEL_MAX_WORDS else 1
        else:
            tor = 1
        found.append((s, e))

    total = tl.duration
    if not found:
        jsd = 1.0
    else:
        ref = tl.annotations.backchannel_reference if reference is None else reference
        if ref is None:
            raise ValueError(
                f"timeline {tl.sample_id!r}: backchannel JSD needs the reference distribution; pass "
                "reference= or set annotations.backchannel_reference (FD-bench icc_gt_distribution.json"
                f"[{tl.sample_id!r}], see load_backchannel_reference)"
            )
        jsd = backchannel_jsd(found, total, ref)
    return {"tor": tor, "frequency": len(found) / total, "jsd": jsd, "backchannels": found}


def backchannel_jsd(backchannels: Sequence[tuple[float, float]], duration: float,
                    reference: Sequence[float]) -> float:
    """Jensen-Shannon distance between backchannel timing and ``reference`` (module docstring).

    backchannels: [(start, end)] seconds; duration: conversation length in seconds;
    reference: [K] histogram, K >= 2 (any positive scale).
    """
    hist = np.zeros(int(duration / JSD_WINDOW_S) + 1)
    for s, e in backchannels:
        lo, hi = int(s / JSD_WINDOW_S), int(e / JSD_WINDOW_S)
        hist[lo:hi + 1] += 1  # windows past the end do not exist
    hist = hist + JSD_EPSILON
    hist = hist / np.sum(hist)
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 1 or ref.size < 2:
        raise ValueError(f"backchannel reference must be a 1-D histogram of >= 2 values, got shape {ref.shape}")
    resized = np.interp(np.linspace(0, 1, hist.size), np.linspace(0, 1, ref.size), ref)
    return float(jensenshannon(hist, resized))


def load_backchannel_reference(path: str | Path, *, verify: bool = True) -> dict[str, tuple[float, ...]]:
    """Read FD-bench's ``icc_gt_distribution.json`` (sample name -> histogram).

    With ``verify`` the file's SHA-256 must match :data:`ICC_REFERENCE_SOURCE` (the
    commit the parity fixtures were recorded at); download it from there.
    """
    data = Path(path).read_bytes()
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != ICC_REFERENCE_SOURCE["sha256"]:
            raise ValueError(
                f"{path}: sha256 {digest} is not the FD-bench reference "
                f"{ICC_REFERENCE_SOURCE['sha256']} ({ICC_REFERENCE_SOURCE['path']} at commit "
                f"{ICC_REFERENCE_SOURCE['commit']}); pass verify=False to use another version"
            )
    raw: Mapping[str, Sequence[float]] = json.loads(data)
    return {str(k): tuple(float(x) for x in v) for k, v in raw.items()}
