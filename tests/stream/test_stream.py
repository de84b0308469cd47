"""The micro-turn layout and packing: round trips, causality, masks, segments."""

import numpy as np
import pytest

from tests.stream.random_turns import random_turns
from tml.kernels import SPLIT_SIZE
from tml.stream import LossKind, Modality, layout, pack, split_at_micro_turns, unlayout
from tml.stream.packing import ATTENTION_SPLIT, Packer
from tml.text import ByteTokenizer

TOK = ByteTokenizer()
OUTPUT_MODALITIES = (Modality.TEXT_OUT, Modality.SPEECH_OUT)


def is_output(seq, i):
    """A position belongs to the model's outputs: after <out> within its micro-turn."""
    return seq.modality[i] in OUTPUT_MODALITIES or (
        seq.modality[i] == Modality.CONTROL
        and TOK.control_name(seq.tokens[i]) in ("<speak>", "<silence>", "<backchannel>", "<delegate>", "<end>")
    )


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_turns_tokens_turns(seed):
    turns = random_turns(np.random.default_rng(seed), 12)
    seq = layout(turns)
    back = unlayout(seq)
    assert len(back) == len(turns)
    for a, b in zip(turns, back):
        assert a.equals(b)


def test_every_micro_turn_has_both_directions():
    seq = layout(random_turns(np.random.default_rng(0), 20))
    for t in range(20):
        here = seq.micro_turn == t
        assert (seq.modality[here] == Modality.AUDIO_IN).sum() == 4
        names = [TOK.control_name(x) for x in seq.tokens[here]]
        assert ("<speak>" in names) != ("<silence>" in names)
        assert names[-1] == "<end>"


@pytest.mark.parametrize("seed", range(3))
def test_causality_at_the_data_level(seed):
    seq = layout(random_turns(np.random.default_rng(seed), 15))
    out = np.array([is_output(seq, i) for i in range(len(seq))])
    for t in range(15):
        here = seq.micro_turn == t
        inputs_t = np.flatnonzero(here & ~out)
        outputs_t = np.flatnonzero(here & out)
        assert inputs_t.max() < outputs_t.min(), f"an output of turn {t} precedes its inputs"
        later_inputs = np.flatnonzero((seq.micro_turn == t + 1) & ~out)
        if len(later_inputs):
            assert outputs_t.max() < later_inputs.min(), f"an input of turn {t + 1} precedes outputs of {t}"


@pytest.mark.parametrize("seed", range(3))
def test_loss_masks_cover_exactly_the_model_outputs(seed):
    turns = random_turns(np.random.default_rng(seed), 15)
    seq = layout(turns)
    out = np.array([is_output(seq, i) for i in range(len(seq))])
    assert np.array_equal(seq.loss_kind != LossKind.NONE, out)
    assert seq.text_mask.sum() == sum(len(t.model_text.encode()) for t in turns)
    assert seq.speech_mask.sum() == 4 * sum(t.model_speech is not None for t in turns)
    # <speak>|<silence>, each action, <end>
    assert seq.control_mask.sum() == sum(2 + len(t.control) for t in turns)
    assert not (seq.loss_kind[seq.modality == Modality.AUDIO_IN]).any()
    assert not (seq.loss_kind[seq.modality == Modality.VIDEO]).any()


def test_sampler_prefix_is_a_prefix_of_the_training_layout():
    """layout(outputs=False) of a turn is exactly the start of that turn in the full layout."""
    turns = random_turns(np.random.default_rng(1), 6)
    full = layout(turns)
    for t, turn in enumerate(turns):
        start = int(np.flatnonzero(full.micro_turn == t)[0])
        pre = layout([turn], outputs=False, first_micro_turn=t, first_position=start)
        s = slice(start, start + len(pre))
        for name in ("tokens", "modality", "positions", "micro_turn", "loss_kind", "dmel"):
            assert np.array_equal(getattr(pre, name), getattr(full, name)[s]), name


def test_split_only_at_micro_turn_boundaries_and_positions_restart():
    turns = random_turns(np.random.default_rng(2), 40)
    seq = layout(turns)
    pieces = split_at_micro_turns(seq, max_tokens=64, max_patches=8)
    assert len(pieces) > 3
    for p in pieces:
        assert TOK.control_name(p.tokens[0]) == "<mt>"
        assert p.positions[0] == 0 and np.array_equal(p.positions, np.arange(len(p)))
        assert len(p) <= 64 and len(p.patches) <= 8
    rebuilt = [mt for p in pieces for mt in unlayout(p)]
    assert len(rebuilt) == 40 and all(a.equals(b) for a, b in zip(turns, rebuilt))


def test_a_micro_turn_larger_than_a_row_is_a_clear_error():
    seq = layout(random_turns(np.random.default_rng(3), 3))
    with pytest.raises(ValueError, match="row_length"):
        split_at_micro_turns(seq, max_tokens=8, max_patches=8)


def test_packing_segments_positions_and_padding():
    rng = np.random.default_rng(4)
    convs = [layout(random_turns(rng, int(rng.integers(2, 30)))) for _ in range(6)]
    rows = pack(convs, row_length=128, max_patches=12)
    assert rows.tokens.shape[1] == 128 and rows.patches.shape[1] == 12
    total_tokens = sum(len(c) for c in convs)
    assert (rows.segment_ids > 0).sum() == total_tokens
    recovered = []
    for r in range(len(rows)):
        row = rows.row(r)
        pad = row.segment_ids == 0
        assert (row.modality[pad] == Modality.PAD).all() and (row.loss_kind[pad] == 0).all()
        # padding only after the last segment and in the gaps before aligned segment starts
        # (each shorter than the alignment)
        starts = np.flatnonzero(~pad & (np.r_[-1, row.segment_ids[:-1]] != row.segment_ids))
        assert starts[0] == 0 and all(int(x) % ATTENTION_SPLIT == 0 for x in starts)
        ends = [int(np.flatnonzero(row.segment_ids == row.segment_ids[x])[-1]) + 1 for x in starts]
        assert all(0 <= b - e < ATTENTION_SPLIT for e, b in zip(ends, starts[1:]))
        assert pad[ends[-1]:].all() and (~pad[:ends[-1]]).sum() == sum(
            e - b for b, e in zip(starts, ends))
        for s in np.unique(row.segment_ids[~pad]):
            seg = np.flatnonzero(row.segment_ids == s)
            assert np.array_equal(row.positions[seg], np.arange(len(seg)))
            piece = row.slice(int(seg[0]), int(seg[-1]) + 1)
            recovered.extend(unlayout(piece))
    expected = [mt for c in convs for mt in unlayout(c)]
    assert len(recovered) == len(expected)
    assert all(a.equals(b) for a, b in zip(expected, recovered))


def test_packing_with_alignment_starts_every_segment_on_a_multiple():
    rng = np.random.default_rng(5)
    convs = [layout(random_turns(rng, int(rng.integers(2, 12)))) for _ in range(8)]
    rows = pack(convs, row_length=256, max_patches=16, align=128)
    starts = []
    for r in range(len(rows)):
        seg = rows.segment_ids[r]
        first = np.flatnonzero((seg > 0) & (np.r_[0, seg[:-1]] != seg))
        starts.extend(first.tolist())
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(rows.positions[r][idx], np.arange(len(idx)))
    assert starts and all(s % 128 == 0 for s in starts)
    assert (rows.segment_ids > 0).sum() == sum(len(c) for c in convs)


def test_packing_aligns_to_the_attention_split_by_default_and_refuses_other_alignments():
    """Packed rows score bitwise like the sampler only when every segment starts on a
    multiple of the attention split size: that is the default, and anything else is refused
    naming the setting and the value to use."""
    assert ATTENTION_SPLIT == SPLIT_SIZE      # the copy packing keeps to stay JAX-free
    assert Packer(256, 8).align == ATTENTION_SPLIT
    for bad in (1, 32, 96):
        with pytest.raises(ValueError, match=rf"loader.align={bad}\b.*set loader.align=64"):
            Packer(256, 8, align=bad)
    with pytest.raises(ValueError, match="loader.row_length"):
        Packer(320, 8, align=128)
