"""The micro-turn layout: micro-turns ↔ token rows. Used by the trainer **and** the sampler.

Layout version 1. Each micro-turn is laid out as its inputs, then the model's outputs::

    <mt> <audio>×4 [<patch>×P] [<typed> bytes…] [<bg> bytes…]          inputs
    <out> [bytes…] (<speak> <speech>×4 | <silence>) [control…] <end>    outputs

* ``<audio>`` / ``<speech>`` positions carry one dMel frame each (``dmel[i]``: 80 bins);
  ``<patch>`` positions carry one 40×40×2 video patch (``patches[patch_index[i]]``).
* Every micro-turn has both directions: inputs always hold 4 audio frames, outputs always
  hold ``<speak>`` + 4 frames or ``<silence>``, then ``<end>``.
* Loss is placed on the positions whose content the model emits (predicted from the
  position before): text bytes (``LossKind.TEXT``), speech frames (``SPEECH``), and
  ``<speak>``/``<silence>``/control tokens/``<end>`` (``CONTROL``). Inputs and the
  structural ``<out>`` carry no loss.
* Causality in time follows from the order: no output of micro-turn *t* precedes an input
  of *t*; no input of *t + 1* precedes an output of *t*.

The sampler lays out a micro-turn's inputs with ``layout([turn], outputs=False)`` and
appends decoded outputs token by token; it never re-implements this file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import numpy as np

from tml.stream.micro_turns import FRAMES_PER_MICRO_TURN, N_MELS, MicroTurn
from tml.text import CONTROL_ACTIONS, ByteTokenizer, Tokenizer

LAYOUT_VERSION = 1
PATCH_SHAPE = (2, 40, 40, 3)


class Modality(enum.IntEnum):
    PAD = 0
    CONTROL = 1      # <mt>, <typed>, <bg>, <out>, <speak>, <silence>, actions, <end>
    AUDIO_IN = 2     # a user dMel frame
    VIDEO = 3        # a video patch
    TYPED = 4        # bytes the user typed
    BACKGROUND = 5   # bytes of a background result
    TEXT_OUT = 6     # bytes the model writes
    SPEECH_OUT = 7   # a model dMel frame


class LossKind(enum.IntEnum):
    NONE = 0
    TEXT = 1
    SPEECH = 2
    CONTROL = 3


@dataclass
class StreamArrays:
    """The nine arrays of the layout, shared by one sequence (:class:`Tokens`, shapes [L, ...])
    and a batch of packed rows (:class:`tml.stream.PackedRows`, the same with a leading [B]).

    Attributes (L = length, N = number of patches):
        tokens: int32 [L] token ids (placeholders at audio, speech and patch positions).
        modality: int8 [L] :class:`Modality`.
        positions: int32 [L] position within the segment (restarts per segment).
        segment_ids: int32 [L] 1-based segment of each position, 0 = padding.
        micro_turn: int32 [L] micro-turn index within its conversation.
        loss_kind: int8 [L] :class:`LossKind` of the position's content.
        dmel: uint8 [L, 80] dMel bins at AUDIO_IN / SPEECH_OUT positions, 0 elsewhere.
        patch_index: int32 [L] row into ``patches`` at VIDEO positions, -1 elsewhere.
        patches: uint8 [N, 2, 40, 40, 3] video patches.
    """

    tokens: np.ndarray
    modality: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    micro_turn: np.ndarray
    loss_kind: np.ndarray
    dmel: np.ndarray
    patch_index: np.ndarray
    patches: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by field name, in field order (what the model's ``batch`` is)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def text_mask(self) -> np.ndarray:
        return self.loss_kind == LossKind.TEXT

    @property
    def speech_mask(self) -> np.ndarray:
        return self.loss_kind == LossKind.SPEECH

    @property
    def control_mask(self) -> np.ndarray:
        return self.loss_kind == LossKind.CONTROL


STREAM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StreamArrays))


@dataclass
class Tokens(StreamArrays):
    """A laid-out token sequence (one conversation, a piece of one, or a packed row): the
    :class:`StreamArrays` of shape [L, ...]."""

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, start: int, stop: int) -> "Tokens":
        """Positions [start, stop) with their patches; positions restart at 0."""
        idx = self.patch_index[start:stop]
        used = idx[idx >= 0]
        first = int(used.min()) if len(used) else 0
        return Tokens(
            tokens=self.tokens[start:stop],
            modality=self.modality[start:stop],
            positions=self.positions[start:stop] - self.positions[start],
            segment_ids=self.segment_ids[start:stop],
            micro_turn=self.micro_turn[start:stop],
            loss_kind=self.loss_kind[start:stop],
            dmel=self.dmel[start:stop],
            patch_index=np.where(idx >= 0, idx - first, -1).astype(np.int32),
            patches=self.patches[first : first + len(used)],
        )

    def micro_turn_starts(self) -> np.ndarray:
        """Indices where a new micro-turn (or segment) begins."""
        change = np.ones(len(self), bool)
        change[1:] = (self.micro_turn[1:] != self.micro_turn[:-1]) | (
            self.segment_ids[1:] != self.segment_ids[:-1]
        )
        return np.flatnonzero(change & (self.segment_ids > 0))


_DEFAULT_TOKENIZER = ByteTokenizer()


def layout(
    turns: list[MicroTurn],
    tokenizer: Tokenizer = _DEFAULT_TOKENIZER,
    *,
    outputs: bool = True,
    first_micro_turn: int = 0,
    first_position: int = 0,
    segment_id: int = 1,
) -> Tokens:
    """Lay out micro-turns as one token sequence (see the module docstring).

    Args:
        turns: consecutive micro-turns.
        outputs: False lays out only the inputs (the sampler's prefill of the last turn).
        first_micro_turn, first_position: indices of the first turn / token, so a
            sequence can be continued (the sampler appends turn after turn).
    """
    c = tokenizer.control_id
    ids: list[int] = []
    mods: list[int] = []
    kinds: list[int] = []
    mts: list[int] = []
    dmel_blocks: list[tuple[int, np.ndarray]] = []
    patch_blocks: list[np.ndarray] = []
    patch_starts: list[int] = []

    def put(token_ids, modality, kind, turn):
        ids.extend(token_ids)
        mods.extend([modality] * len(token_ids))
        kinds.extend([kind] * len(token_ids))
        mts.extend([turn] * len(token_ids))

    for i, mt in enumerate(turns):
        t = first_micro_turn + i
        if mt.user_audio.shape != (FRAMES_PER_MICRO_TURN, N_MELS):
            raise ValueError(f"micro-turn {t}: user_audio must be [4, 80], got {mt.user_audio.shape}")
        put([c("<mt>")], Modality.CONTROL, LossKind.NONE, t)
        dmel_blocks.append((len(ids), mt.user_audio))
        put([c("<audio>")] * FRAMES_PER_MICRO_TURN, Modality.AUDIO_IN, LossKind.NONE, t)
        if mt.video is not None and len(mt.video):
            if mt.video.shape[1:] != PATCH_SHAPE or mt.video.dtype != np.uint8:
                raise ValueError(f"micro-turn {t}: video must be uint8 [P, 2, 40, 40, 3]")
            patch_starts.append(len(ids))
            patch_blocks.append(mt.video)
            put([c("<patch>")] * len(mt.video), Modality.VIDEO, LossKind.NONE, t)
        if mt.typed:
            put([c("<typed>")], Modality.CONTROL, LossKind.NONE, t)
            put(tokenizer.encode(mt.typed), Modality.TYPED, LossKind.NONE, t)
        if mt.background:
            put([c("<bg>")], Modality.CONTROL, LossKind.NONE, t)
            put(tokenizer.encode(mt.background), Modality.BACKGROUND, LossKind.NONE, t)
        put([c("<out>")], Modality.CONTROL, LossKind.NONE, t)
        if not outputs:
            continue
        if mt.model_text:
            put(tokenizer.encode(mt.model_text), Modality.TEXT_OUT, LossKind.TEXT, t)
        if mt.model_speech is not None:
            if mt.model_speech.shape != (FRAMES_PER_MICRO_TURN, N_MELS):
                raise ValueError(f"micro-turn {t}: model_speech must be [4, 80]")
            put([c("<speak>")], Modality.CONTROL, LossKind.CONTROL, t)
            dmel_blocks.append((len(ids), mt.model_speech))
            put([c("<speech>")] * FRAMES_PER_MICRO_TURN, Modality.SPEECH_OUT, LossKind.SPEECH, t)
        else:
            put([c("<silence>")], Modality.CONTROL, LossKind.CONTROL, t)
        for name in mt.control:
            if name not in CONTROL_ACTIONS:
                raise ValueError(f"micro-turn {t}: {name!r} is not a control action {CONTROL_ACTIONS}")
            put([c(name)], Modality.CONTROL, LossKind.CONTROL, t)
        put([c("<end>")], Modality.CONTROL, LossKind.CONTROL, t)

    n = len(ids)
    dmel = np.zeros((n, N_MELS), np.uint8)
    for start, block in dmel_blocks:
        dmel[start : start + len(block)] = block
    patch_index = np.full(n, -1, np.int32)
    count = 0
    for start, block in zip(patch_starts, patch_blocks):
        patch_index[start : start + len(block)] = np.arange(count, count + len(block))
        count += len(block)
    patches = (
        np.concatenate(patch_blocks) if patch_blocks else np.zeros((0, *PATCH_SHAPE), np.uint8)
    )
    return Tokens(
        tokens=np.asarray(ids, np.int32),
        modality=np.asarray(mods, np.int8),
        positions=np.arange(first_position, first_position + n, dtype=np.int32),
        segment_ids=np.full(n, segment_id, np.int32),
        micro_turn=np.asarray(mts, np.int32),
        loss_kind=np.asarray(kinds, np.int8),
        dmel=dmel,
        patch_index=patch_index,
        patches=patches,
    )


def unlayout(seq: Tokens, tokenizer: Tokenizer = _DEFAULT_TOKENIZER) -> list[MicroTurn]:
    """Invert :func:`layout` (one segment): token sequence → micro-turns.

    Raises ValueError naming the position where the sequence breaks the layout.
    """
    name = tokenizer.control_name
    turns: list[MicroTurn] = []
    starts = list(seq.micro_turn_starts()) + [int((seq.segment_ids > 0).sum())]
    for a, b in zip(starts[:-1], starts[1:]):
        toks, mods = seq.tokens[a:b], seq.modality[a:b]
        if name(toks[0]) != "<mt>":
            raise ValueError(f"position {a}: micro-turn does not open with <mt>")
        fields_: dict = {}
        audio = np.flatnonzero(mods == Modality.AUDIO_IN)
        fields_["user_audio"] = seq.dmel[a + audio]
        video = np.flatnonzero(mods == Modality.VIDEO)
        if len(video):
            fields_["video"] = seq.patches[seq.patch_index[a + video]]
        for key, mod in (("typed", Modality.TYPED), ("background", Modality.BACKGROUND),
                         ("model_text", Modality.TEXT_OUT)):
            fields_[key] = tokenizer.decode(toks[mods == mod].tolist())
        speech = np.flatnonzero(mods == Modality.SPEECH_OUT)
        if len(speech):
            fields_["model_speech"] = seq.dmel[a + speech]
        out = [name(x) for x, m in zip(toks, mods) if m == Modality.CONTROL]
        if "<out>" not in out:
            raise ValueError(f"position {a}: micro-turn has no <out>")
        after = out[out.index("<out>") + 1 :]
        if not after or after[-1] != "<end>":
            raise ValueError(f"position {a}: micro-turn outputs do not close with <end>")
        fields_["control"] = tuple(x for x in after if x in CONTROL_ACTIONS)
        turns.append(MicroTurn(**fields_))
    return turns
