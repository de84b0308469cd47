"""The micro-turn stream: conversations → micro-turns → token rows → packed batches."""

from tml.stream.conversation import (
    MICRO_TURN_SECONDS,
    SAMPLE_RATE,
    SAMPLES_PER_MICRO_TURN,
    VIDEO_FPS,
    Conversation,
    Event,
    Word,
)
from tml.stream.layout import LAYOUT_VERSION, STREAM_FIELDS, LossKind, Modality, StreamArrays, Tokens, layout, unlayout
from tml.stream.micro_turns import MicroTurn, conversation_dmel, to_micro_turns
from tml.stream.packing import Packer, PackedRows, pack, split_at_micro_turns

__all__ = [
    "Conversation", "Event", "LAYOUT_VERSION", "LossKind", "MICRO_TURN_SECONDS", "MicroTurn",
    "Modality", "PackedRows", "STREAM_FIELDS", "StreamArrays", "Packer", "SAMPLES_PER_MICRO_TURN", "SAMPLE_RATE", "Tokens",
    "VIDEO_FPS", "Word", "conversation_dmel", "layout", "pack", "split_at_micro_turns",
    "to_micro_turns", "unlayout",
]
