"""Full-Duplex-Bench v1.5-style overlap behaviours, decided by a documented rule (no LLM).

FD-bench v1.5 plays user speech over the model's turn in four scenarios
(:data:`~tml.eval.timeline.OVERLAP_KINDS`: user interruption, user backchannel,
talking to others, background speech) and asks whether the model stopped, resumed or
responded, and how fast. It labels the content relation with GPT-4o
(``v1_v1.5/evaluation/eval_behavior.py``) and measures timing from VAD segments
(``get_timing.py``). tml does both from the :class:`~tml.eval.timeline.Timeline`.

Timing lists, as FD-bench's ``get_timing.py`` computes them (:func:`timing_intervals`)
------------------------------------------------------------------------------------
User segments (``Timeline.user_segments``) are merged across gaps ``<= 0.6`` s, model
speech segments (runs of speaking micro-turns) across gaps ``<= 0.5`` s. Then

* ``latency_stop_list``: every non-empty intersection of a user segment and a model
  segment, ``[start, end]`` rounded to 1 ms; of intersections ending at the same
  millisecond only the shortest is kept. Its length is how long the model kept talking
  over the user.
* ``latency_resp_list``: for each user segment, ``[user end, first model segment start
  strictly after it]`` (rounded to 1 ms); of user segments answered by the same model
  start only the latest user end (the shortest gap) is kept.

Parity with FD-bench's functions is tested (``tests/eval/test_overlap.py``, fixture
``tests/eval/fixtures/fdb_v15/``).

The behaviour rule (:func:`overlap_behaviour`), per annotated :class:`OverlapEvent`
---------------------------------------------------------------------------------
Micro-turn resolution; ``onset`` is the micro-turn containing the event start.

1. **Speaking at onset**: the model speaks in micro-turn ``onset``.
2. **Stopped** (only if speaking at onset): the first silent run of at least
   :data:`STOP_SILENCE_S` (0.4 s = 2 micro-turns) beginning at or after ``onset`` begins
   within :data:`STOP_WINDOW_S` (2.0 s) of the event start. ``stop_latency`` = that
   run's start time - event start, clipped at 0. A model that never stops in time
   **continued** (``behaviour = "continue"``).
3. **Spoke again**: the first speech onset (a speaking micro-turn after a silent one)
   after the stop -- or, if the model was silent at onset, at or after the event
   start -- that begins no later than :data:`RESPONSE_WINDOW_S` (3.0 s) after the event
   end. ``response_latency`` = its start - event end, clipped at 0. None in time:
   ``behaviour = "silent"``.
4. **Respond or resume**: the words of the model's utterance starting at that onset
   (words starting from the onset until the next silent run of
   :data:`STOP_SILENCE_S`) are normalised (lower case, punctuation stripped). If any of
   the event's ``response_words`` occurs among them, ``behaviour = "respond"``,
   otherwise ``"resume"``. With no ``response_words`` annotated the content test cannot
   run: a ``user_interruption`` event then counts new speech as ``"respond"`` (a new
   turn after being cut off), the other kinds as ``"resume"``.

Both windows are inclusive, with ``BOUND_SLACK_S`` (1 ns, ``tml.eval.timeline``) of slack for
float rounding.

``success``: a user interruption should be answered (``respond``); a user
backchannel, talk to others or background speech should not derail the model
(``continue`` or ``resume``).

Per-micro-turn credit: for a user interruption, -0.2 for each micro-turn the model
kept speaking from ``onset`` until it stopped (talking over the user); for the other
kinds, -0.2 for each silent micro-turn between the stop and the model speaking again
(derailed). Everything else is 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tml.eval.timeline import BOUND_SLACK_S, MICRO_TURN_S, MICRO_TURNS_PER_S, OverlapEvent, Timeline, Word

USER_MERGE_GAP_S = 0.6
"""FD-bench ``get_timing.py``: user segments closer than this are one segment."""
MODEL_MERGE_GAP_S = 0.5
"""FD-bench ``get_timing.py``: model segments closer than this are one segment."""
STOP_SILENCE_S = 0.4
"""A silence at least this long (2 micro-turns) is a stop; shorter ones are breaths."""
STOP_WINDOW_S = 2.0
"""The model must stop within this many seconds of the overlap start to count as stopping."""
RESPONSE_WINDOW_S = 3.0
"""Speech starting later than this after the overlap end is not a response to it."""

SUCCESS = {
    "user_interruption": ("respond",),
    "user_backchannel": ("continue", "resume"),
    "talking_to_others": ("continue", "resume"),
    "background_speech": ("continue", "resume"),
}
"""The behaviours that count as handling each overlap kind well."""

_STOP_MICRO_TURNS = round(STOP_SILENCE_S * MICRO_TURNS_PER_S)


# ------------------------------------------------------------------ FD-bench timing
def merge_segments(segments: Sequence[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    """Sort and merge segments whose gap (next start - previous end) is ``<= gap`` s."""
    merged: list[tuple[float, float]] = []
    for s, e in sorted(segments):
        if merged and s - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _stop_intervals(user: Sequence[tuple[float, float]], model: Sequence[tuple[float, float]]) -> list[list[float]]:
    shortest: dict[int, tuple[float, float]] = {}
    i = j = 0
    while i < len(user) and j < len(model):
        s, e = max(user[i][0], model[j][0]), min(user[i][1], model[j][1])
        if e > s:
            key = int(round(e * 1000))
            if key not in shortest or e - s < shortest[key][1] - shortest[key][0]:
                shortest[key] = (s, e)
        if user[i][1] < model[j][1]:
            i += 1
        else:
            j += 1
    return [[round(s, 3), round(e, 3)] for s, e in sorted(shortest.values(), key=lambda iv: iv[1])]


def _response_intervals(user: Sequence[tuple[float, float]], model: Sequence[tuple[float, float]]) -> list[list[float]]:
    latest: dict[int, list[float]] = {}
    for _, u_end in user:
        nxt = next((s for s, _ in model if s > u_end), None)
        if nxt is None:
            continue
        key = int(round(nxt * 1000))
        gap = [round(u_end, 3), round(nxt, 3)]
        if key not in latest or gap[0] > latest[key][0]:
            latest[key] = gap
    return sorted(latest.values(), key=lambda iv: iv[1])


def timing_intervals(tl: Timeline) -> dict[str, list[list[float]]]:
    """FD-bench v1.5 ``latency_intervals.json`` for this timeline (module docstring).

    Returns ``{"latency_stop_list": [[s, e], ...], "latency_resp_list": [[user_end, model_start], ...]}``.
    """
    user = merge_segments(tl.user_segments, USER_MERGE_GAP_S)
    model = merge_segments(tl.model_speech_segments(), MODEL_MERGE_GAP_S)
    return {"latency_stop_list": _stop_intervals(user, model), "latency_resp_list": _response_intervals(user, model)}


# ------------------------------------------------------------------ behaviour rule
_PUNCT = re.compile(r"[^\w\s']")


def normalise(text: str) -> str:
    """Lower case, punctuation (except apostrophes) removed, surrounding space stripped."""
    return _PUNCT.sub("", text.lower()).strip()


def _first_silence(speaking: Sequence[bool], start: int) -> int | None:
    """First micro-turn >= start beginning a silent run of >= _STOP_MICRO_TURNS (the
    conversation's end counts as silence)."""
    n = len(speaking)
    for t in range(start, n):
        if not speaking[t] and all(not speaking[u] for u in range(t, min(t + _STOP_MICRO_TURNS, n))):
            return t
    return None


def _first_onset(speaking: Sequence[bool], start: int) -> int | None:
    """First micro-turn >= start where speech begins (speaking, previous one silent)."""
    for t in range(max(start, 0), len(speaking)):
        if speaking[t] and (t == 0 or not speaking[t - 1]):
            return t
    return None


def _utterance_words(tl: Timeline, onset: int) -> list[Word]:
    stop = _first_silence(tl.model_speaking, onset)
    t0 = onset / MICRO_TURNS_PER_S
    t1 = tl.duration if stop is None else stop / MICRO_TURNS_PER_S
    return [w for w in tl.model_words if t0 <= w.start < t1]


def overlap_behaviour(tl: Timeline, event: OverlapEvent) -> dict[str, Any]:
    """Apply the behaviour rule (module docstring) to one overlap event.

    Returns ``{"kind", "speaking_at_onset", "stopped" (None if not speaking), "stop_latency",
    "spoke_again", "response_latency", "behaviour", "success", "credit"}``; latencies in
    seconds or None.
    """
    speaking = tl.model_speaking
    onset = tl.micro_turn_at(event.start)
    credit = [0.0] * tl.n_micro_turns
    at_onset = speaking[onset]
    stopped = stop_latency = None
    search_from = onset
    if at_onset:
        stop = _first_silence(speaking, onset)
        stop_time = None if stop is None else stop / MICRO_TURNS_PER_S
        stopped = stop_time is not None and stop_time - event.start <= STOP_WINDOW_S + BOUND_SLACK_S
        if stopped:
            stop_latency = max(stop_time - event.start, 0.0)
            search_from = stop
            if event.kind == "user_interruption":
                for t in range(onset, stop):
                    credit[t] = -MICRO_TURN_S
    result = {"kind": event.kind, "speaking_at_onset": at_onset, "stopped": stopped, "stop_latency": stop_latency,
              "spoke_again": False, "response_latency": None}
    if at_onset and not stopped:
        behaviour = "continue"
    else:
        nxt = _first_onset(speaking, search_from)
        nxt_time = None if nxt is None else nxt / MICRO_TURNS_PER_S
        if nxt_time is None or nxt_time - event.end > RESPONSE_WINDOW_S + BOUND_SLACK_S:
            behaviour = "silent"
            if at_onset and event.kind != "user_interruption":
                for t in range(search_from, tl.n_micro_turns):
                    credit[t] = -MICRO_TURN_S
        else:
            result["spoke_again"] = True
            result["response_latency"] = max(nxt_time - event.end, 0.0)
            if at_onset and event.kind != "user_interruption":
                for t in range(search_from, nxt):
                    credit[t] = -MICRO_TURN_S
            said = {normalise(w.text) for w in _utterance_words(tl, nxt)}
            targets = {normalise(w) for w in event.response_words}
            if targets:
                behaviour = "respond" if said & targets else "resume"
            else:
                behaviour = "respond" if event.kind == "user_interruption" else "resume"
    result.update(behaviour=behaviour, success=behaviour in SUCCESS[event.kind], credit=credit)
    return result


def overlap_behaviours(tl: Timeline) -> list[dict[str, Any]]:
    """:func:`overlap_behaviour` for every annotated overlap event, in order."""
    if not tl.annotations.overlaps:
        raise ValueError(
            f"timeline {tl.sample_id!r}: overlap scoring needs annotations.overlaps "
            "(FD-bench v1.5 metadata.json timestamps [start, end] and the scenario kind)"
        )
    return [overlap_behaviour(tl, ev) for ev in tl.annotations.overlaps]
