"""Interactivity scorers: pure, deterministic functions of a :class:`Timeline`.

A :class:`Timeline` (``tml.eval.timeline``) is one conversation as plain data: the
user's speech and words, the model's per-micro-turn speech activity and words,
control tokens and the scenario's annotations. Scorers read it and return a flat
dict per conversation (with per-micro-turn ``credit`` where they can assign it, for
RL); :func:`aggregate` turns lists of those into per-task means for ``eval.json``.

* ``tml.eval.fdb_v1``: Full-Duplex-Bench v1 (pause handling, smooth turn-taking,
  backchannel, user interruption), parity-tested against FD-bench's own code.
* ``tml.eval.overlap``: FD-bench v1.5-style overlap behaviours (stop / continue /
  resume / respond, stop and response latency) by a documented rule, and FD-bench
  v1.5's timing intervals.
* ``tml.eval.tasks``: TimeSpeak, CueSpeak and RepCount-style scorers.
* ``tml.eval.aggregate``: per-task means, skipping undefined (``None``) values.
"""

from tml.eval.aggregate import aggregate, summarize
from tml.eval.fdb_v1 import (
    ICC_REFERENCE_SOURCE,
    backchannel,
    backchannel_jsd,
    interruption_end,
    load_backchannel_reference,
    pause_handling,
    smooth_turn_taking,
    took_turn,
    user_interruption,
)
from tml.eval.overlap import merge_segments, normalise, overlap_behaviour, overlap_behaviours, timing_intervals
from tml.eval.tasks import content_matches, cue_speak, rep_count, spoken_numbers, time_speak
from tml.eval.timeline import (
    MICRO_TURN_S,
    OVERLAP_KINDS,
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

__all__ = [
    "MICRO_TURN_S", "OVERLAP_KINDS", "Annotations", "ControlToken", "Cue", "OverlapEvent", "RepetitionCount",
    "SpeakRequest", "Timeline", "TimelineError", "Word",
    "ICC_REFERENCE_SOURCE", "backchannel", "backchannel_jsd", "interruption_end", "load_backchannel_reference",
    "pause_handling", "smooth_turn_taking", "took_turn", "user_interruption",
    "merge_segments", "normalise", "overlap_behaviour", "overlap_behaviours", "timing_intervals",
    "content_matches", "cue_speak", "rep_count", "spoken_numbers", "time_speak",
    "aggregate", "summarize",
]
