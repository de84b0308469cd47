"""A conversation as recorded: waveforms, aligned words, timed events, optional video.

This is what data pipelines produce (synthetic corpus, ingestion of real corpora) and what
webdataset shards store. :func:`tml.stream.micro_turns.to_micro_turns` cuts it into
200 ms micro-turns; :func:`tml.stream.layout.layout` turns those into token rows.

Time is in seconds from the start of the conversation. Audio is 16 kHz mono float32 in
[-1, 1]; video is uint8 RGB at ``VIDEO_FPS`` (two frames per micro-turn, which is the
hMLP's temporal patch size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000
MICRO_TURN_SECONDS = 0.2
SAMPLES_PER_MICRO_TURN = 3_200
VIDEO_FPS = 10

SPEAKERS = ("user", "model", "other")  # "other": background speech not addressed to the model
EVENT_KINDS = (
    "typed",        # input: the user typed text
    "background",   # input: a background agent returned a result
    "model_text",   # output: text the model writes (besides or instead of speech)
    "backchannel",  # output: the model backchannels without taking the turn
    "delegate",     # output: the model delegates work (text = the request)
)
INPUT_EVENTS = ("typed", "background")


@dataclass(frozen=True)
class Word:
    """One aligned word. ``speaker`` is one of SPEAKERS."""

    text: str
    start: float
    end: float
    speaker: str


@dataclass(frozen=True)
class Event:
    """A timed text or control event; ``kind`` is one of EVENT_KINDS."""

    time: float
    kind: str
    text: str = ""


@dataclass
class Conversation:
    """A two-party conversation.

    Attributes:
        id: unique key (used as the webdataset ``__key__``).
        scenario: what the example teaches ("turn_taking", "backchannel", ...; "real" for
            ingested corpora).
        user_audio: float32 [S] — everything the model hears (the user and any background
            speakers), 16 kHz.
        model_audio: float32 [S] — the model's own speech, the speech target, 16 kHz.
        words: aligned words of every speaker, sorted by start time.
        events: timed typed text, background results, model text and control events.
        video: uint8 [F, H, W, 3] at VIDEO_FPS, or None.
        meta: free-form JSON-serialisable facts (e.g. the expected answer of a question).
    """

    id: str
    scenario: str
    user_audio: np.ndarray
    model_audio: np.ndarray
    words: list[Word] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    video: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return len(self.user_audio) / SAMPLE_RATE

    @property
    def n_micro_turns(self) -> int:
        return -(-len(self.user_audio) // SAMPLES_PER_MICRO_TURN)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (used on every ingested file)."""
        if self.user_audio.ndim != 1 or self.model_audio.ndim != 1:
            raise ValueError(f"{self.id}: audio must be 1-D mono per channel")
        if len(self.user_audio) != len(self.model_audio):
            raise ValueError(
                f"{self.id}: user and model audio lengths differ "
                f"({len(self.user_audio)} vs {len(self.model_audio)} samples)"
            )
        if len(self.user_audio) == 0:
            raise ValueError(f"{self.id}: empty audio")
        for a in (self.user_audio, self.model_audio):
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{self.id}: audio contains NaN or inf")
        dur = self.duration
        for w in self.words:
            if w.speaker not in SPEAKERS:
                raise ValueError(f"{self.id}: word {w.text!r} has unknown speaker {w.speaker!r}")
            if not (0.0 <= w.start <= w.end):
                raise ValueError(f"{self.id}: word {w.text!r} has start {w.start} > end {w.end}")
            if w.end > dur + 1e-3:
                raise ValueError(
                    f"{self.id}: word {w.text!r} ends at {w.end:.3f}s, after the audio ({dur:.3f}s)"
                )
        for e in self.events:
            if e.kind not in EVENT_KINDS:
                raise ValueError(f"{self.id}: event kind {e.kind!r} not in {EVENT_KINDS}")
            if not 0.0 <= e.time <= dur + 1e-3:
                raise ValueError(f"{self.id}: event at {e.time:.3f}s outside the audio ({dur:.3f}s)")
        if self.video is not None:
            v = self.video
            if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
                raise ValueError(f"{self.id}: video must be uint8 [F, H, W, 3], got {v.dtype} {v.shape}")

    def to_json(self) -> dict:
        """Everything but the arrays, as JSON-ready data."""
        return {
            "id": self.id,
            "scenario": self.scenario,
            "words": [dataclasses.astuple(w) for w in self.words],
            "events": [dataclasses.astuple(e) for e in self.events],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict, user_audio, model_audio, video=None) -> "Conversation":
        return cls(
            id=d["id"],
            scenario=d["scenario"],
            user_audio=user_audio,
            model_audio=model_audio,
            words=[Word(*w) for w in d["words"]],
            events=[Event(*e) for e in d["events"]],
            video=video,
            meta=d.get("meta", {}),
        )
