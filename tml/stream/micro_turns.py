"""Cut a :class:`Conversation` into 200 ms micro-turns of discrete content.

A :class:`MicroTurn` holds what one micro-turn contributes to the stream: the user's
4 dMel frames, this micro-turn's video patches, typed text and background results
(inputs), and the model's text, 4 dMel speech frames or silence, and control tokens
(outputs). It is the unit the layout serialises and the sampler exchanges.

Assignment rules (documented, tested):

* micro-turn *t* covers ``[0.2 t, 0.2 (t + 1))`` seconds; audio is zero-padded to a whole
  number of micro-turns, so dMel frames ``4t .. 4t+3`` belong to micro-turn *t*;
* the model **speaks** in micro-turn *t* if one of its aligned words overlaps that
  interval; its speech frames are then the dMel frames of the model channel, otherwise
  the micro-turn's output is ``<silence>``;
* a timed event belongs to the micro-turn containing its time; several texts of one kind
  in a micro-turn are joined with a space;
* video frame *f* (at 10 fps) belongs to micro-turn ``f // 2``: one temporal patch pair
  per micro-turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tml.audio import dmel
from tml.stream.conversation import (
    MICRO_TURN_SECONDS,
    SAMPLES_PER_MICRO_TURN,
    VIDEO_FPS,
    Conversation,
)
from tml.vision import TEMPORAL_PATCH_SIZE, frames_to_patches

FRAMES_PER_MICRO_TURN = 4
N_MELS = 80
# Event kinds that are control outputs, and their tokens.
CONTROL_EVENT_TOKENS = {"backchannel": "<backchannel>", "delegate": "<delegate>"}


@dataclass
class MicroTurn:
    """Discrete content of one micro-turn.

    Attributes:
        user_audio: uint8 [4, 80] dMel bins of what the model hears.
        video: uint8 [P, 2, 40, 40, 3] patches of this micro-turn's frame pair, or None.
        typed: text the user typed during the micro-turn.
        background: background results that arrived during the micro-turn.
        model_text: text the model writes in this micro-turn.
        model_speech: uint8 [4, 80] dMel bins the model says, or None for silence.
        control: control tokens the model emits (e.g. ``("<backchannel>",)``).
    """

    user_audio: np.ndarray
    video: np.ndarray | None = None
    typed: str = ""
    background: str = ""
    model_text: str = ""
    model_speech: np.ndarray | None = None
    control: tuple[str, ...] = field(default_factory=tuple)

    def equals(self, other: "MicroTurn") -> bool:
        def same(a, b):
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and np.array_equal(a, b)

        return (
            same(self.user_audio, other.user_audio)
            and same(self.video, other.video)
            and same(self.model_speech, other.model_speech)
            and (self.typed, self.background, self.model_text, tuple(self.control))
            == (other.typed, other.background, other.model_text, tuple(other.control))
        )


def pad_to_micro_turns(audio: np.ndarray) -> np.ndarray:
    """Zero-pad float32 [S] audio to a whole number of micro-turns."""
    return np.pad(audio, (0, -len(audio) % SAMPLES_PER_MICRO_TURN))


def conversation_dmel(conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [4 n, 80] dMel bins of the user and model channels (n = micro-turns)."""
    return dmel(pad_to_micro_turns(conv.user_audio)), dmel(pad_to_micro_turns(conv.model_audio))


def _index(t: float, n: int) -> int:
    return min(int(np.floor(t / MICRO_TURN_SECONDS + 1e-9)), n - 1)


def to_micro_turns(
    conv: Conversation,
    user_dmel: np.ndarray | None = None,
    model_dmel: np.ndarray | None = None,
) -> list[MicroTurn]:
    """Conversation → micro-turns. Precomputed dMel (as stored in shards) skips the STFT."""
    n = conv.n_micro_turns
    if user_dmel is None or model_dmel is None:
        user_dmel, model_dmel = conversation_dmel(conv)
    need = n * FRAMES_PER_MICRO_TURN
    if user_dmel.shape != (need, N_MELS) or model_dmel.shape != (need, N_MELS):
        raise ValueError(
            f"{conv.id}: dMel shapes {user_dmel.shape}/{model_dmel.shape} do not match "
            f"{n} micro-turns (expected {(need, N_MELS)})"
        )
    speaking = np.zeros(n, bool)
    for w in conv.words:
        if w.speaker == "model":
            first = _index(w.start, n)
            last = _index(max(w.start, w.end - 1e-6), n)
            speaking[first : last + 1] = True
    texts: dict[str, list[list[str]]] = {
        k: [[] for _ in range(n)] for k in ("typed", "background", "model_text")
    }
    controls: list[list[str]] = [[] for _ in range(n)]
    for e in sorted(conv.events, key=lambda e: e.time):
        t = _index(e.time, n)
        if e.kind in CONTROL_EVENT_TOKENS:
            controls[t].append(CONTROL_EVENT_TOKENS[e.kind])
            if e.kind == "delegate" and e.text:
                texts["model_text"][t].append(e.text)  # the request the model hands over
        else:
            texts[e.kind][t].append(e.text)
    video_per_turn: list[np.ndarray | None] = [None] * n
    if conv.video is not None and len(conv.video):
        frames_per_turn = int(round(VIDEO_FPS * MICRO_TURN_SECONDS))
        assert frames_per_turn == TEMPORAL_PATCH_SIZE, "one patch pair per micro-turn"
        for t in range(min(n, -(-len(conv.video) // frames_per_turn))):
            pair = conv.video[t * frames_per_turn : (t + 1) * frames_per_turn]
            video_per_turn[t], _ = frames_to_patches(pair)
    turns = []
    for t in range(n):
        frames = slice(t * FRAMES_PER_MICRO_TURN, (t + 1) * FRAMES_PER_MICRO_TURN)
        turns.append(
            MicroTurn(
                user_audio=user_dmel[frames],
                video=video_per_turn[t],
                typed=" ".join(texts["typed"][t]),
                background=" ".join(texts["background"][t]),
                model_text=" ".join(texts["model_text"][t]),
                model_speech=model_dmel[frames] if speaking[t] else None,
                control=tuple(controls[t]),
            )
        )
    return turns
