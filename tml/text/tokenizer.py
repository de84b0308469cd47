"""Text tokenizers for the micro-turn stream.

A tokenizer maps text to integer ids and back and owns the **control tokens** of the
micro-turn stream (``<mt>``, ``<out>``, ``<silence>`` ...). The stream layout only talks
to the :class:`Tokenizer` protocol, so a BPE vocabulary can replace the byte-level one by
implementing the same five members.

Byte-level vocabulary (``ByteTokenizer``)::

    ids 0..255            the UTF-8 bytes
    ids 256..256+C-1      the control tokens, in CONTROL_TOKENS order
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

# Order is part of the vocabulary: appending is compatible, reordering is not.
CONTROL_TOKENS: tuple[str, ...] = (
    "<pad>",          # padding of packed rows; never attended, never scored
    "<mt>",           # opens a micro-turn
    "<audio>",        # placeholder id of a user-audio dMel frame position (input)
    "<patch>",        # placeholder id of a video patch position (input)
    "<typed>",        # opens the user's typed text of a micro-turn (input)
    "<bg>",           # opens a background result of a micro-turn (input)
    "<out>",          # end of the inputs, start of the model's outputs
    "<speak>",        # the model speaks in this micro-turn: dMel frames follow
    "<speech>",       # placeholder id of a model speech dMel frame position (output)
    "<silence>",      # the model is silent in this micro-turn
    "<backchannel>",  # control: the model backchannels ("mm-hm") without taking the turn
    "<delegate>",     # control: the model hands work to a background agent
    "<end>",          # end of the model's outputs for this micro-turn
)

# Control tokens that carry a decision of the model (scored with the control loss).
CONTROL_ACTIONS: tuple[str, ...] = ("<backchannel>", "<delegate>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the stream layout needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Text → ids of ordinary (non-control) tokens."""

    def decode(self, ids: Sequence[int]) -> str:
        """Ids of ordinary tokens → text. Control ids are an error."""

    def control_id(self, name: str) -> int:
        """Id of a control token such as ``"<mt>"``."""

    def control_name(self, token_id: int) -> str | None:
        """Name of a control id, or None for an ordinary token."""


class ByteTokenizer:
    """UTF-8 bytes plus the control tokens; no training, no files."""

    n_bytes = 256

    def __init__(self, control_tokens: Sequence[str] = CONTROL_TOKENS):
        if len(set(control_tokens)) != len(control_tokens):
            raise ValueError(f"duplicate control tokens in {list(control_tokens)}")
        self._controls = tuple(control_tokens)
        self._control_ids = {n: self.n_bytes + i for i, n in enumerate(self._controls)}
        self.vocab_size = self.n_bytes + len(self._controls)

    @property
    def control_tokens(self) -> tuple[str, ...]:
        return self._controls

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < self.n_bytes]
        if bad:
            raise ValueError(f"decode() got non-byte ids {bad[:5]}; strip control tokens first")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def control_id(self, name: str) -> int:
        try:
            return self._control_ids[name]
        except KeyError:
            raise KeyError(
                f"unknown control token {name!r}; known: {', '.join(self._controls)}"
            ) from None

    def control_name(self, token_id: int) -> str | None:
        i = int(token_id) - self.n_bytes
        return self._controls[i] if 0 <= i < len(self._controls) else None
