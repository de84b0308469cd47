"""Packing laid-out conversations into fixed-length training rows.

A conversation longer than a row is split **at micro-turn boundaries** into pieces; each
piece becomes one segment of a row, with its own segment id and positions restarting at
0, so attention never crosses pieces. Rows are filled greedily in arrival order: a piece
that does not fit in the current row (tokens or patches) closes the row, which is padded
with ``<pad>`` (segment 0, no loss). The packer is deterministic: the rows depend only on
the order of the pieces, which is what makes the loader's state restorable.

``align`` makes every segment start at a multiple of ``align`` (pads in between). It must
be a multiple of the attention kernel's KV split size (:data:`ATTENTION_SPLIT`, 64): then a
segment's key splits line up with those of the same conversation alone in a row or in a
sampler's KV cache, so packed scoring stays bitwise equal to the sampler (see
``tml.kernels`` attention). Any other value is refused (:func:`check_align`); the default
is the split size itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from tml.stream.layout import PATCH_SHAPE, STREAM_FIELDS, Modality, StreamArrays, Tokens
from tml.stream.micro_turns import N_MELS
from tml.text import ByteTokenizer

#: ``tml.kernels.SPLIT_SIZE``, the keys per attention split: a copy, so that packing (and the
#: loader's worker processes) do not import JAX; ``tests/stream/test_stream.py`` asserts they agree.
ATTENTION_SPLIT = 64


def check_align(align: int, row_length: int) -> None:
    """Refuse an ``align`` that would break packed/sampler bitwise scoring, naming the setting."""
    if align < 1 or align % ATTENTION_SPLIT:
        raise ValueError(
            f"loader.align={align}: packed segments must start on multiples of the attention "
            f"split size {ATTENTION_SPLIT} (tml.kernels.SPLIT_SIZE), else a packed row does not "
            f"score bitwise like the sampler; set loader.align={ATTENTION_SPLIT}")
    if row_length % align:
        raise ValueError(f"loader.align={align} must divide loader.row_length={row_length}: set "
                         f"loader.row_length to a multiple of {align}")


def split_at_micro_turns(seq: Tokens, max_tokens: int, max_patches: int) -> list[Tokens]:
    """Cut one laid-out conversation into pieces of ≤ max_tokens tokens and ≤ max_patches
    patches, each made of whole micro-turns; positions restart in every piece."""
    starts = seq.micro_turn_starts().tolist() + [len(seq)]
    patch_count = np.concatenate([[0], np.cumsum(seq.patch_index >= 0)])
    pieces = []
    begin = 0
    for i in range(1, len(starts)):
        a, b = starts[i - 1], starts[i]
        if b - a > max_tokens or patch_count[b] - patch_count[a] > max_patches:
            raise ValueError(
                f"micro-turn {int(seq.micro_turn[a])} alone has {b - a} tokens and "
                f"{patch_count[b] - patch_count[a]} patches; rows hold {max_tokens} tokens and "
                f"{max_patches} patches. Raise data.row_length / data.max_patches_per_row."
            )
        if b - starts[begin] > max_tokens or patch_count[b] - patch_count[starts[begin]] > max_patches:
            pieces.append(seq.slice(starts[begin], a))
            begin = i - 1
    pieces.append(seq.slice(starts[begin], len(seq)))
    return pieces


@dataclass
class PackedRows(StreamArrays):
    """A batch of packed rows: the :class:`StreamArrays` of :class:`Tokens` with a leading
    [B] axis; ``patches`` is uint8 [B, max_patches, 2, 40, 40, 3] and ``patch_index``
    indexes its second axis."""

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def stack(cls, rows: list[Tokens]) -> "PackedRows":
        return cls(**{k: np.stack([getattr(r, k) for r in rows]) for k in STREAM_FIELDS})

    def row(self, i: int) -> Tokens:
        return Tokens(**{k: v[i] for k, v in self.as_dict().items()})


class Packer:
    """Greedy packer: feed pieces with :meth:`add`, collect finished rows (``Tokens`` of
    exactly ``row_length`` positions, ``max_patches`` patch slots)."""

    def __init__(self, row_length: int, max_patches: int, pad_id: int | None = None,
                 align: int = ATTENTION_SPLIT):
        check_align(align, row_length)
        self.row_length = row_length
        self.max_patches = max_patches
        self.align = align
        self.pad_id = ByteTokenizer().control_id("<pad>") if pad_id is None else pad_id
        self._pieces: list[tuple[int, Tokens]] = []  # (start offset, piece)
        self._used = 0
        self._patches = 0

    @property
    def empty(self) -> bool:
        return not self._pieces

    def _start(self) -> int:
        """Where the next piece would start (the used length rounded up to ``align``)."""
        return -(-self._used // self.align) * self.align

    def fits(self, piece: Tokens) -> bool:
        return (self._start() + len(piece) <= self.row_length
                and self._patches + len(piece.patches) <= self.max_patches)

    def add(self, piece: Tokens) -> Iterator[Tokens]:
        """Add one piece; yields the row it closed, if any."""
        if len(piece) > self.row_length or len(piece.patches) > self.max_patches:
            raise ValueError("piece larger than a row: split it with split_at_micro_turns")
        if not self.fits(piece):
            yield self.flush()
        self._pieces.append((self._start(), piece))
        self._used = self._start() + len(piece)
        self._patches += len(piece.patches)

    def flush(self) -> Tokens:
        """Close the current row (padding it) and return it."""
        L, P = self.row_length, self.max_patches
        row = Tokens(
            tokens=np.full(L, self.pad_id, np.int32),
            modality=np.full(L, Modality.PAD, np.int8),
            positions=np.zeros(L, np.int32),
            segment_ids=np.zeros(L, np.int32),
            micro_turn=np.zeros(L, np.int32),
            loss_kind=np.zeros(L, np.int8),
            dmel=np.zeros((L, N_MELS), np.uint8),
            patch_index=np.full(L, -1, np.int32),
            patches=np.zeros((P, *PATCH_SHAPE), np.uint8),
        )
        n_patches = 0
        for seg, (at, piece) in enumerate(self._pieces, start=1):
            s = slice(at, at + len(piece))
            row.tokens[s] = piece.tokens
            row.modality[s] = piece.modality
            row.positions[s] = piece.positions
            row.segment_ids[s] = seg
            row.micro_turn[s] = piece.micro_turn
            row.loss_kind[s] = piece.loss_kind
            row.dmel[s] = piece.dmel
            row.patch_index[s] = np.where(piece.patch_index >= 0, piece.patch_index + n_patches, -1)
            row.patches[n_patches : n_patches + len(piece.patches)] = piece.patches
            n_patches += len(piece.patches)
        self._pieces, self._used, self._patches = [], 0, 0
        return row


def pack(sequences: list[Tokens], row_length: int, max_patches: int,
         align: int = ATTENTION_SPLIT) -> PackedRows:
    """Pack whole laid-out conversations into rows (convenience for tests and tools)."""
    packer = Packer(row_length, max_patches, align=align)
    rows: list[Tokens] = []
    for seq in sequences:
        for piece in split_at_micro_turns(seq, row_length, max_patches):
            rows.extend(packer.add(piece))
    if not packer.empty:
        rows.append(packer.flush())
    return PackedRows.stack(rows)
