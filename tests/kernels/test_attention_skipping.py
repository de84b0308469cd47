"""Training rows visit only the splits with visible keys: the static block plan (causal,
sliding window), and the forward and every gradient (dq, dk, dv) bit for bit equal to
the unskipped version (every block against every split); forward and dq also equal the
unblocked path (explicit query positions). Within the plan, the pairs without a visible
key in the data (segment boundaries, padding) are not computed either, with the same
bits as computing every pair of the plan. The ``standard`` companions: dense attention
over only the keys a block (or a segment) can see differs from the full row in its bits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tml.kernels import attention
from tml.kernels import split_kv_attention as ska
from tml.kernels.split_kv import prepare, unprepare
from tml.kernels.split_kv_attention import (
    QUERY_BLOCK,
    _bi_attention,
    _pad_rows,
    block_plan,
    visited_pairs,
)
from tml.kernels.testing import assert_bits_equal, bits_equal
from tml.kernels.tiling import round_up

HKV, G, D, T = 2, 2, 32, 200


def test_block_plan_is_constant_blocks_and_skips_masked_splits():
    assert QUERY_BLOCK == 64
    causal = block_plan(256, 0, 256, True, None, 64)
    assert causal.pair_block.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert causal.pair_split.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert causal.by_block.shape == (4, 4) and causal.by_split.shape == (4, 4)
    assert causal.by_block[0].tolist() == [0, 10, 10, 10]  # 10 = the fully masked dummy pair
    windowed = block_plan(1024, 0, 1024, True, 256, 64)  # the `small` attention layer
    assert len(windowed.pair_block) == 1 + 2 + 3 + 4 + 12 * 5  # vs 256 pairs unskipped, 136 causal only
    assert all(len(set(windowed.pair_split[windowed.pair_block == b])) == min(b + 1, 5) for b in range(16))
    assert len(block_plan(1024, 0, 1024, True, 256, 64, skip=False).pair_block) == 256
    # the block is in query positions whatever the row length: 1 block for 1..64 queries
    assert block_plan(7, 0, 64, True, None, 64).by_block.shape == (1, 1)


def _problem(seed, packed):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, T, HKV * G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, T, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, T, HKV, D)), jnp.float32)
    seg = np.zeros((2, T), np.int32)
    if packed:
        seg[:, 64:] = 1
        seg[1, 137:] = 2
    dout = jnp.asarray(rng.standard_normal((2, T, HKV * G, D)), jnp.float32)
    return q, k, v, jnp.asarray(seg), dout


def _out_and_grads_fn(q, k, v, seg, dout, causal, window, skip, data_skip=False):
    T = q.shape[1]

    def f(q, k, v):
        L = prepare(q, k, v, None, seg, seg, None, D**-0.5, 64)
        L = _pad_rows(L, round_up(T, QUERY_BLOCK) * G)
        out = _bi_attention(L, causal, window, 64, "reference", (T, 0, L.k.shape[2], causal, window, 64, skip),
                            data_skip)
        return unprepare(out, q.shape, q.dtype)

    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(dout))


_out_and_grads = jax.jit(_out_and_grads_fn, static_argnames=("causal", "window", "skip", "data_skip"))


@pytest.mark.parametrize("causal,window,packed", [(True, None, True), (True, 50, False), (False, 70, True)])
def test_skipping_changes_no_bits_forward_and_gradients(causal, window, packed):
    q, k, v, seg, dout = _problem(3, packed)
    skipped = _out_and_grads(q, k, v, seg, dout, causal, window, True)
    full = _out_and_grads(q, k, v, seg, dout, causal, window, False)
    for a, b, name in zip(skipped, full, ("out", "dq", "dk", "dv")):
        assert_bits_equal(a, b, f"{name}: skipped vs unskipped (causal={causal}, window={window})")
    # the public call is the skipping version
    public = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, sliding_window=window)
    assert_bits_equal(public, skipped[0], "attention() full row")


def test_full_row_equals_unblocked_path_forward_and_dq():
    """Explicit q_positions take the unblocked path (every split, one GEMM per split)."""
    q, k, v, seg, dout = _problem(4, True)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))

    def loss(q, k, v, positions):
        o = attention(q, k, v, q_positions=positions, q_segment_ids=seg, kv_segment_ids=seg, sliding_window=90)
        return jnp.sum(o * dout), o

    blocked = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, None), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    plain = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, pos), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert_bits_equal(blocked[1], plain[1], "forward")
    assert_bits_equal(blocked[0][0], plain[0][0], "dq")
    for a, b in zip(blocked[0][1:], plain[0][1:]):  # dk, dv: summed per query block, then over blocks
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_standard_mode_skipping_changes_bits():
    """Dense attention of the first query block against only the keys it can see
    (what skipping means for a dense kernel) differs from the same queries in the full row."""
    q, k, v, _, _ = _problem(5, False)
    std = jax.jit(functools.partial(attention, mode="standard"))
    full = np.asarray(std(q, k, v, q_positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))))
    pos = jnp.broadcast_to(jnp.arange(QUERY_BLOCK, dtype=jnp.int32), (2, QUERY_BLOCK))
    cut = np.asarray(std(q[:, :QUERY_BLOCK], k[:, :QUERY_BLOCK], v[:, :QUERY_BLOCK], q_positions=pos))
    assert not bits_equal(cut, full[:, :QUERY_BLOCK])
    np.testing.assert_allclose(cut, full[:, :QUERY_BLOCK], atol=3e-6, rtol=3e-6)
    # batch_invariant on the same cut
    bi = jax.jit(attention)
    assert_bits_equal(bi(q[:, :QUERY_BLOCK], k[:, :QUERY_BLOCK], v[:, :QUERY_BLOCK], q_positions=pos),
                      bi(q, k, v)[:, :QUERY_BLOCK], "batch_invariant: first block alone vs in the row")


@pytest.mark.parametrize("flavour", ["tpu", "triton"])
def test_pallas_query_block_is_a_constant(flavour):
    """The Pallas forward's query block does not follow the row count: decode (2 rows),
    a prefill chunk (48 rows) and a training row (512 rows) all run blocks of BLOCK_Q."""
    from tml.kernels.pallas.attention_kernel import BLOCK_Q, attention_forward

    sizes = []
    for tq in (1, 24, 256):
        q = jnp.zeros((1, tq, 4, 32))
        k = jnp.zeros((1, 256, 2, 32))
        L = prepare(q, k, k, jnp.zeros((1, tq), jnp.int32), None, None, None, 0.1, 64)
        jaxpr = jax.make_jaxpr(lambda L: attention_forward(L, flavour=flavour, interpret=True))(L)
        (call,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
        q_block = call.params["grid_mapping"].block_mappings[3].block_shape  # qs [B, H, rows, D]
        sizes.append(getattr(q_block[2], "block_size", q_block[2]))
    assert sizes == [BLOCK_Q] * 3, sizes


# -- pairs without a visible key in the data: segment boundaries and padding -----------

TP = 330  # 6 query blocks, 6 splits (the last partly past the row)


def _packed(seed):
    """Rows packed with several segments and trailing padding (segment 0), segments
    starting on and off split boundaries; a third row of one segment with no padding."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((3, TP, HKV * G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, TP, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, TP, HKV, D)), jnp.float32)
    seg = np.zeros((3, TP), np.int32)
    seg[0, :70], seg[0, 70:200], seg[0, 200:260] = 1, 2, 3  # 260.. padding
    seg[1, :128], seg[1, 128:256], seg[1, 256:300] = 4, 5, 6
    seg[2] = 7
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    return q, k, v, jnp.asarray(seg), dout


def test_visited_pairs_are_exactly_the_pairs_with_a_visible_key():
    _, _, _, seg, _ = _packed(0)
    seg_np = np.asarray(seg)
    for causal, window in ((True, None), (True, 100), (False, 90)):
        q = jnp.zeros((3, TP, HKV * G, D))
        k = jnp.zeros((3, TP, HKV, D))
        L = _pad_rows(prepare(q, k, k, None, seg, seg, None, 1.0, 64), round_up(TP, QUERY_BLOCK) * G)
        plan = block_plan(TP, 0, L.k.shape[2], causal, window, 64)
        work, count = (np.asarray(x) for x in jax.jit(
            lambda L, plan=plan, causal=causal, window=window: visited_pairs(L, plan, causal, window, 64))(L))
        n_pairs = len(plan.pair_block)
        for b in range(3):  # brute force: any (query of the block, key of the split) visible
            t = np.arange(TP)
            vis = seg_np[b][:, None] == seg_np[b][None, :]
            vis &= (t[None, :] <= t[:, None]) if causal else True
            if window is not None:
                vis &= np.abs(t[:, None] - t[None, :]) < window
            want = [p for p in range(n_pairs) if vis[plan.pair_block[p] * 64:(plan.pair_block[p] + 1) * 64,
                                                       plan.pair_split[p] * 64:(plan.pair_split[p] + 1) * 64].any()]
            assert count[b] == len(want) and work[b, :len(want)].tolist() == want
            assert (work[b, len(want):] == n_pairs).all()
        assert count[0] < n_pairs and count[1] < n_pairs  # segment boundaries and padding skip pairs
    # causal, row 1 (segments on split boundaries): each block sees only its own segment's splits
    assert count.tolist()[1] < count.tolist()[2]


@pytest.mark.parametrize("causal,window", [(True, None), (True, 100), (False, 90)])
def test_segment_skipping_changes_no_bits_forward_and_gradients(causal, window, monkeypatch):
    """Raw bits of out, dq, dk, dv: computing only the pairs with a visible key == every
    pair of the static plan (the previous computation), for several loop chunk sizes."""
    q, k, v, seg, dout = _packed(1)
    full = _out_and_grads(q, k, v, seg, dout, causal, window, True, data_skip=False)
    skipped = _out_and_grads(q, k, v, seg, dout, causal, window, True, data_skip=True)
    for a, b, name in zip(skipped, full, ("out", "dq", "dk", "dv")):
        assert_bits_equal(a, b, f"{name}: data skipping vs static plan (causal={causal}, window={window})")
    monkeypatch.setattr(ska, "PAIRS_PER_STEP", 5)  # the loop's chunk is no part of the bits
    fn = functools.partial(_out_and_grads_fn, causal=causal, window=window, skip=True, data_skip=True)
    for a, b, name in zip(jax.jit(fn)(q, k, v, seg, dout), full, ("out", "dq", "dk", "dv")):
        assert_bits_equal(a, b, f"{name}: chunk 5")
    public = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, sliding_window=window)
    assert_bits_equal(public, skipped[0], "attention() full row")


def test_segment_alone_equals_segment_in_packed_row_standard_does_not():
    """What skipping other segments means: a segment computed as its own row (only its
    keys) gives the bits it has inside the packed row in batch_invariant (its segment
    starts on a split boundary, as the packer aligns it); the dense standard kernel over
    only the segment's keys does not."""
    q, k, v, seg, _ = _packed(2)
    a, b = 128, 256  # row 1's segment 5
    cut = [x[1:2, a:b] for x in (q, k, v)]
    for mode, equal in (("batch_invariant", True), ("standard", False)):
        f = jax.jit(functools.partial(attention, mode=mode))
        alone = np.asarray(f(*cut))
        packed = np.asarray(f(q, k, v, q_segment_ids=seg, kv_segment_ids=seg))[1:2, a:b]
        assert bits_equal(alone, packed) == equal, mode
        np.testing.assert_allclose(alone, packed, atol=3e-6, rtol=3e-6)


def _unrolled_fold(parts, plan, rows):
    """The forward fold written as an unrolled chain (the code before the loop)."""
    from tml.kernels.split_kv import combine, finalize, init_state

    c_s, l_s, o_s = parts
    B, H, _, QBr, Dv = o_s.shape
    state = init_state((B, H, plan.by_block.shape[0], QBr), Dv)
    for m in range(plan.by_block.shape[1]):
        idx = jnp.asarray(plan.by_block[:, m])
        state = combine(state, c_s[:, :, idx], l_s[:, :, idx], o_s[:, :, idx])
    out, c, l = finalize(state)
    return out.reshape(B, H, rows, -1), c.reshape(B, H, rows, 1), l.reshape(B, H, rows, 1)


def _row_grads(q, k, v, dout):
    """out, dq, dk, dv of a full causal row (the public call)."""
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mode="batch_invariant"), q, k, v)
    return (out, *vjp(dout))


def test_gradients_do_not_depend_on_how_the_forward_fold_is_written(monkeypatch):
    """The forward fold is a loop (unrolled, XLA:CPU fused the whole chain into each
    consumer of the output, so the backward recomputed it). Unrolled or looped, the output
    and every gradient keep their bits, because the backward's ``di = rowsum(do * out)``
    rounds its products before the sum: no FMA forms there, whatever was fused around it.
    Without that rounding, dq and dk of this row (512 positions, ``small``'s heads, the
    cotangent a constant of the program) change with the fold's form (measured on the
    pinned jax)."""
    rng = np.random.default_rng(6)
    q, dout = (jnp.asarray(rng.standard_normal((1, 512, 8, 64)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((1, 512, 4, 64)), jnp.float32) for _ in range(2))

    def both():  # new functions each time: traced under the current patches
        looped = jax.jit(lambda q, k, v: _row_grads(q, k, v, dout))(q, k, v)
        with monkeypatch.context() as m:
            m.setattr(ska, "_fold_blocks", _unrolled_fold)
            unrolled = jax.jit(lambda q, k, v: _row_grads(q, k, v, dout))(q, k, v)
        return looped, unrolled

    looped, unrolled = both()
    for a, b, name in zip(looped, unrolled, ("out", "dq", "dk", "dv")):
        assert_bits_equal(a, b, f"{name}: looped vs unrolled fold")
    monkeypatch.setattr(ska, "rounded", lambda x: x)
    looped, unrolled = both()
    assert bits_equal(looped[0], unrolled[0])
    assert not (bits_equal(looped[1], unrolled[1]) and bits_equal(looped[2], unrolled[2])), \
        "without rounding di's products, the fold's form should have changed dq or dk"
