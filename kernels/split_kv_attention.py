"""Attention: one function for training rows, prefill chunks and decode steps.

Shapes::

    q [B, Tq, Hq, D], k, v [B, Tk, Hkv, D]   (Hq = G * Hkv, grouped-query heads)
    q_positions    [B, Tq] int   KV slot index each query sits at
                                 (default: the last Tq slots, ``Tk - Tq + arange(Tq)``)
    q_segment_ids  [B, Tq] int   (default all 0)
    kv_segment_ids [B, Tk] int   (default all 0; segment ids must be > INT32_MIN + 1,
                                 the two smallest values mark invalid slots / padding rows)
    kv_lengths     [B]     int   valid KV slots (default Tk); slots >= length are ignored
    -> out [B, Tq, Hq, D] (dtype of q)

Key j is visible to a query at slot p iff ``j < kv_length``, segments match,
``j <= p`` (causal) and ``p - j < sliding_window`` (if given). Positions are KV-slot
indices, not RoPE positions: in a packed training row query t sits at slot t; a
prefill chunk of c tokens written at slots [p, p+c) has ``q_positions = p + arange(c)``
and ``kv_lengths = p + c``; a decode step is a chunk of one. The cache capacity Tk
may exceed the valid length; what the spare slots hold never changes the result
(they must be finite — a zero-initialised cache is).

``batch_invariant`` algorithm (also the Pallas kernel's):

* scores are computed in base 2 — ``s = (q * scale * log2 e) . k`` — per query row
  against **fixed-size KV splits** of ``split_size`` slots aligned to slot 0 (the
  split size is fixed, never the number of splits), one GEMM per split;
* each split yields partials: ``c_s = ceil(max s)`` (an integer), ``p = 2^(s - c_s)``
  (exactly 0 where masked), ``l_s = pairwise_sum(p)``, ``o_s = p @ v``;
* the partials are folded **left to right** into ``(c, l, o)``, starting from
  ``(NEG, 0, 0)``: ``c' = max(c, c_s)``, ``l = l * 2^(c-c') + l_s * 2^(c_s-c')``,
  same for ``o``; ``out = o * (1 / l)`` (0 for a query that sees no key).

Because the running shift is an integer, every rescale factor is an exact power of
two built from bits (flushed to 0 below ``2^-64``), so each product in the combine
is exact (barring subnormal underflow of values below ~1e-19). That matters on XLA:CPU, which contracts ``a*b + c`` into an FMA inside a
fusion and rewrites ``a / broadcast(b)`` into ``a * (1/b)`` — both depending on how
the surrounding program was fused. With exact products the result is the same
whether or not an FMA was formed, so a decode program, a prefill program, a training
program and the Pallas kernel all produce the same bits.

A split that is entirely masked (future slots, spare cache capacity, other segments)
leaves ``(c, l, o)`` bit for bit unchanged, and a query's row never mixes with other
rows, so its output is the same whether it is computed in a full row, in a chunk of
any size, or alone against a cache of any capacity.

**Only the splits with visible keys are visited** (one exact rule for training rows
and for :func:`tml.kernels.paged_attention`): a split whose keys are all invisible to a
query row yields ``c_s = NEG, l_s = 0, o_s = 0``, and ``combine`` then leaves the row's
``(c, l, o)`` bit for bit unchanged (the state's factor is exactly 1, the split's is
flushed to 0), so skipping it changes no bits. A full row (``q_positions=None``: query t
on slot ``Tk - Tq + t``) is cut into blocks of ``QUERY_BLOCK = 64`` query positions (a
constant, never derived from the row count) and each block visits only the splits
``[lo, hi]`` of its static plan (:func:`block_plan`): ``hi`` the split of its last query
(causal), ``lo`` the split of its first query minus ``window - 1`` (sliding window). The
visited (block, split) pairs are computed in one batched GEMM per product; each block
folds its splits left to right (a block with fewer splits than the widest folds the
fully masked dummy pair, which is a no-op by the same rule). Forward and ``dq`` are
bit for bit those of the unblocked path; ``dk``/``dv`` are summed per query block and
then over the blocks left to right, and equal the unskipped version bit for bit
(``tests/kernels/test_attention_skipping.py``). Measured (XLA:CPU, 2 cores, see
``kernels/README.md``): the ``small`` sliding-window layer (1024 keys, window 256)
visits 70 of 256 pairs.

Within the static plan, the pairs with **no visible key in the data** (segment
boundaries of a packed row, padding) are not computed either, forward and backward, by
the same rule: :func:`visited_pairs` tests each (block, split) pair's whole mask from the
segment ids (exact for any ids, not only contiguous runs) and compacts each row's
visited pairs in plan order; a ``fori_loop`` whose trip count is data-dependent (the
largest row's count / ``PAIRS_PER_STEP``) computes ``PAIRS_PER_STEP`` pairs per row per
step, in one batched GEMM per product as before, and scatters them into the plan's
per-pair buffers, whose unvisited entries hold the fully masked split's values
(``c_s = NEG, l_s = 0, o_s = 0``; zero gradient parts); the folds are unchanged. Every
output and gradient keeps its bits (``tests/kernels/test_attention_skipping.py``:
raw-bit equal to computing every pair of the plan, for any chunk size). The Pallas
forward (``impl="pallas"``) still visits every split (its backward is this one).
Explicit ``q_positions`` (prefill chunks, decode against a contiguous cache) visit
every split.

The backward pass is a ``custom_vjp`` over the same splits (flash-attention style
recomputation of ``p`` from the saved ``(c, l)``): ``dq`` per query is summed over
splits left to right (batch-invariant), ``dk``/``dv`` contract over the query rows in
one GEMM per split (deterministic run to run).

``standard``: dense scores ``q k^T`` over all keys, ``jax.nn.softmax``, ``p v``.

This module is the API, the jnp reference forward and the ``custom_vjp``; the pieces it
shares with the Pallas forward (:mod:`tml.kernels.pallas.attention_kernel`) — the
kernel :class:`~tml.kernels.split_kv.Layout`, the mask, one split's partials, the
combine — are in :mod:`tml.kernels.split_kv`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .mode import resolve_impl, resolve_mode
from .pallas.attention_kernel import attention_forward
from .split_kv import (
    LN2,
    NEG,
    PAD_QUERY_SEGMENT,
    SEGMENT_SENTINEL,
    Layout,
    combine,
    fill_defaults,
    finalize,
    init_state,
    prepare,
    split_partials,
    unprepare,
    visible,
)
from .tiling import (
    LANES,
    SPLIT_SIZE,
    ordered_sum,
    pad_axis,
    pairwise_sum,
    round_up,
    rounded,
)

_HIGHEST = lax.Precision.HIGHEST
QUERY_BLOCK = 64  # query positions per block of a full row: a constant, never derived from the row count


def _split_views(L: Layout, split_size: int, causal: bool, window: int | None):
    B, H, Tkp, D = L.k.shape
    nS = Tkp // split_size
    k5 = L.k.reshape(B, H, nS, split_size, D)
    v5 = L.v.reshape(B, H, nS, split_size, L.v.shape[-1])
    kv_idx = jnp.arange(Tkp, dtype=jnp.int32).reshape(1, 1, nS, 1, split_size)
    kv_seg = L.kv_seg.reshape(B, 1, nS, 1, split_size)
    mask = visible(L.q_pos[:, None, None, :, None], L.q_seg[:, None, None, :, None], kv_idx, kv_seg, causal, window)
    return nS, k5, v5, mask


def _scores(qs, k5, nS):
    B, H, R, D = qs.shape
    qb = jnp.broadcast_to(qs[:, :, None], (B, H, nS, R, D))
    return lax.dot_general(
        qb, k5, (((4,), (4,)), ((0, 1, 2), (0, 1, 2))), precision=_HIGHEST, preferred_element_type=jnp.float32
    )


def reference_forward(L: Layout, causal: bool, window: int | None, split_size: int):
    """Batch-invariant forward on the kernel layout ->
    (out [B,H,R,Dv] f32, c [B,H,R,1], l [B,H,R,1])."""
    nS, k5, v5, mask = _split_views(L, split_size, causal, window)
    s = _scores(L.qs, k5, nS)  # [B, H, nS, R, S]
    c_s, l_s, o_s = split_partials(s, mask, v5)  # [B, H, nS, R, 1|Dv]
    B, H, R, _ = L.qs.shape
    # keep the per-row arrays a multiple of LANES long (see tiling.LANES)
    Rp = round_up(max(R, 1), LANES)
    c_s, l_s, o_s = pad_axis(c_s, 3, Rp, NEG), pad_axis(l_s, 3, Rp), pad_axis(o_s, 3, Rp)
    state = init_state((B, H, Rp), L.v.shape[-1])
    for j in range(nS):
        state = combine(state, c_s[:, :, j], l_s[:, :, j], o_s[:, :, j])
    out, c, l = finalize(state)
    return out[:, :, :R], c[:, :, :R], l[:, :, :R]


class BlockPlan(NamedTuple):
    """Which (query block, KV split) pairs a full row visits; static numpy int32 arrays.

    pair_block, pair_split [n_pairs] (block-major, splits ascending);
    by_block [n_blocks, max_splits]: pair index of each block's m-th split, ``n_pairs``
    (a fully masked dummy pair) past the block's last; by_split [n_splits, max_blocks]:
    pair index of each split's n-th visiting block (ascending), ``n_pairs`` past the last.
    """

    pair_block: np.ndarray
    pair_split: np.ndarray
    by_block: np.ndarray
    by_split: np.ndarray


@functools.lru_cache(maxsize=512)
def block_plan(n_queries, offset, n_slots, causal, window, split_size, skip=True) -> BlockPlan:
    """The static visiting plan for ``n_queries`` queries at slots ``offset + t`` against
    ``n_slots`` KV slots (a multiple of ``split_size``), cut into blocks of
    ``QUERY_BLOCK``. With ``skip`` a block visits only splits ``[lo, hi]``: ``hi`` the
    split of its last query (causal), ``lo`` the split of its first query minus
    ``window - 1`` (sliding window); without, every split (the unskipped version the
    tests compare against)."""
    n_blocks = max(1, -(-n_queries // QUERY_BLOCK))
    n_splits = n_slots // split_size
    pairs = []
    for i in range(n_blocks):
        lo, hi = 0, n_splits - 1
        if skip:
            p_min = offset + i * QUERY_BLOCK
            p_max = offset + min((i + 1) * QUERY_BLOCK, max(n_queries, 1)) - 1
            hi_key = p_max if causal else (p_max + window - 1 if window is not None else n_slots - 1)
            lo_key = max(p_min - window + 1, 0) if window is not None else 0
            hi_key = min(hi_key, n_slots - 1)
            lo, hi = lo_key // split_size, (hi_key // split_size if hi_key >= lo_key else -1)
        pairs += [(i, j) for j in range(lo, hi + 1)]
    n_pairs = len(pairs)
    per_block = [[n for n, (i, _) in enumerate(pairs) if i == b] for b in range(n_blocks)]
    per_split = [[n for n, (_, j) in enumerate(pairs) if j == s] for s in range(n_splits)]

    def grid(rows):
        width = max(1, max(len(r) for r in rows))
        return np.array([r + [n_pairs] * (width - len(r)) for r in rows], np.int32)

    pb = np.array([i for i, _ in pairs], np.int32)
    ps = np.array([j for _, j in pairs], np.int32)
    return BlockPlan(pb, ps, grid(per_block), grid(per_split))


def _with_dummy(x, value, axis=2):
    """Append one pair of ``value`` (the fully masked split) along the pair axis."""
    return pad_axis(x, axis, x.shape[axis] + 1, value)


def _pair_views(L: Layout, plan: BlockPlan, split_size, causal, window):
    """The visited pairs: q [B,H,nP,QBr,D], k [B,H,nP,S,D], v [B,H,nP,S,Dv], mask [B,1|H,nP,QBr,S]."""
    B, H, Rb, D = L.qs.shape
    nQB = plan.by_block.shape[0]
    S = split_size
    nS = L.k.shape[2] // S
    pb, ps = jnp.asarray(plan.pair_block), jnp.asarray(plan.pair_split)
    qp = L.qs.reshape(B, H, nQB, Rb // nQB, D)[:, :, pb]
    kp = L.k.reshape(B, H, nS, S, D)[:, :, ps]
    vp = L.v.reshape(B, H, nS, S, L.v.shape[-1])[:, :, ps]
    q_pos = L.q_pos.reshape(B, nQB, Rb // nQB)[:, pb][:, None, :, :, None]
    q_seg = L.q_seg.reshape(B, nQB, Rb // nQB)[:, pb][:, None, :, :, None]
    kv_idx = (ps[:, None] * S + jnp.arange(S, dtype=jnp.int32)[None, :])[None, None, :, None, :]
    kv_seg = L.kv_seg.reshape(B, nS, S)[:, ps][:, None, :, None, :]
    return qp, kp, vp, visible(q_pos, q_seg, kv_idx, kv_seg, causal, window)


def _pair_scores(qp, kp):
    return lax.dot_general(qp, kp, (((4,), (4,)), ((0, 1, 2), (0, 1, 2))), precision=_HIGHEST,
                           preferred_element_type=jnp.float32)


def _fold_blocks(parts, plan: BlockPlan, rows: int):
    """Fold each block's pairs left to right. parts: (c_s, l_s [B,H,nP+1,QBr,1], o_s
    [B,H,nP+1,QBr,Dv]), slot nP the fully masked dummy -> (out [B,H,rows,Dv], c, l [B,H,rows,1])."""
    c_s, l_s, o_s = parts
    B, H, _, QBr, Dv = o_s.shape
    state = init_state((B, H, plan.by_block.shape[0], QBr), Dv)
    columns = jnp.asarray(plan.by_block.T)  # [max_splits, n_blocks]: each block's m-th pair

    def fold(m, state):  # each block's m-th split, left to right
        idx = columns[m]
        return combine(state, c_s[:, :, idx], l_s[:, :, idx], o_s[:, :, idx])

    # a loop, not an unrolled chain: XLA:CPU fused the unrolled chain into each consumer of
    # the output, so the backward's di recomputed the whole fold (~40% of a layer's fwd+bwd)
    state = lax.fori_loop(0, plan.by_block.shape[1], fold, state)
    out, c, l = finalize(state)
    return out.reshape(B, H, rows, -1), c.reshape(B, H, rows, 1), l.reshape(B, H, rows, 1)


def blocked_forward(L: Layout, plan: BlockPlan, causal: bool, window: int | None, split_size: int):
    """The reference forward over the plan's pairs only (rows padded to whole query
    blocks) -> (out [B,H,Rb,Dv], c, l [B,H,Rb,1]); bit for bit :func:`reference_forward`."""
    qp, kp, vp, mask = _pair_views(L, plan, split_size, causal, window)
    c_s, l_s, o_s = split_partials(_pair_scores(qp, kp), mask, vp)  # [B, H, nP, QBr, 1|Dv]
    parts = _with_dummy(c_s, NEG), _with_dummy(l_s, 0), _with_dummy(o_s, 0)
    return _fold_blocks(parts, plan, L.qs.shape[2])


def _pair_grads(qp, kp, vp, mask, c_p, rl_p, di_p, do_p):
    """One pair's gradient parts (batch dims [B, H, n]): q [.., QBr, D], k [.., S, D],
    v [.., S, Dv], mask [.., QBr, S]; the block's saved shift c, 1/l, di = rowsum(do * out)
    [.., QBr, 1] and do [.., QBr, Dv] -> dq_p [.., QBr, D], dk_p [.., S, D], dv_p [.., S, Dv]."""
    s = _pair_scores(qp, kp)
    p = jnp.where(mask, jnp.exp2(s - c_p) * rl_p, 0.0)  # softmax probabilities [.., QBr, S]
    batch = ((0, 1, 2), (0, 1, 2))
    dv_p = lax.dot_general(p, do_p, (((3,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do_p, vp, (((4,), (4,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    ds = p * (dp - di_p) * LN2  # gradient w.r.t. the base-2 scores
    dq_p = lax.dot_general(ds, kp, (((4,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    dk_p = lax.dot_general(ds, qp, (((3,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    return dq_p, dk_p, dv_p


def _backward_inputs(out, l, dout):
    """do = dout f32, 1/l (1 where l = 0), di = pairwise rowsum(do * out) [B,H,R,1].

    The products are :func:`~tml.kernels.tiling.rounded` before the sum: fused with it,
    XLA:CPU contracts them into FMAs or not depending on what else it fused (how the
    forward's fold was written changed di's bits)."""
    do = dout.astype(jnp.float32)
    rl = 1.0 / jnp.where(l > 0, l, 1.0)
    return do, rl, pairwise_sum(rounded(do * out), -1, keepdims=True)


def _fold_grads(parts, plan: BlockPlan, L: Layout):
    """dq per block summed over its splits left to right, dk/dv per split summed over its
    visiting blocks left to right. parts: dq_p [B,H,nP+1,QBr,D], dk_p, dv_p [B,H,nP+1,S,D|Dv]
    (slot nP zero: the dummy pair) -> dq [B,H,Rb,D], dk [B,H,Tkp,D], dv [B,H,Tkp,Dv]."""
    def fold(parts, index):  # parts [B,H,nP+1,...] -> [B,H,len(index),...], columns added left to right
        acc = parts[:, :, jnp.asarray(index[:, 0])]
        for m in range(1, index.shape[1]):
            acc = acc + parts[:, :, jnp.asarray(index[:, m])]
        return acc

    dq_p, dk_p, dv_p = parts
    dq = fold(dq_p, plan.by_block).reshape(L.qs.shape)
    return dq, fold(dk_p, plan.by_split).reshape(L.k.shape), fold(dv_p, plan.by_split).reshape(L.v.shape)


def _blocked_backward(L: Layout, plan: BlockPlan, causal, window, split_size, out, c, l, dout):
    """The backward over every pair of the static plan (see :func:`_fold_grads`)."""
    B, H, Rb, _ = L.qs.shape
    nQB, QBr = plan.by_block.shape[0], Rb // plan.by_block.shape[0]
    pb = jnp.asarray(plan.pair_block)
    qp, kp, vp, mask = _pair_views(L, plan, split_size, causal, window)
    blocks = lambda x: x.reshape(B, H, nQB, QBr, x.shape[-1])[:, :, pb]
    do, rl, di = _backward_inputs(out, l, dout)
    parts = _pair_grads(qp, kp, vp, mask, blocks(c), blocks(rl), blocks(di), blocks(do))
    return _fold_grads(tuple(_with_dummy(x, 0) for x in parts), plan, L)


# -- skipping splits by the data: segment boundaries and padding ---------------------------

PAIRS_PER_STEP = 16  # visited (block, split) pairs computed per loop iteration (per row); no bits depend on it


def visited_pairs(L: Layout, plan: BlockPlan, causal: bool, window: int | None, split_size: int):
    """The static plan's pairs whose split holds a key visible to some query of the
    block (same segment, causal, window), per row, in plan order.

    -> work [B, nP] int32: row b's visited pair indices first (ascending), then nP;
    count [B] int32: how many. Exact for any segment ids (not only contiguous runs):
    a pair is dropped only when its whole (QUERY_BLOCK x split) mask is false."""
    B, Rb = L.q_pos.shape
    nQB, nP, S = plan.by_block.shape[0], len(plan.pair_block), split_size
    QBr, nS = Rb // nQB, L.kv_seg.shape[1] // S
    pb, ps = jnp.asarray(plan.pair_block), jnp.asarray(plan.pair_split)
    q_pos = L.q_pos.reshape(B, nQB, QBr)[:, pb][:, :, :, None]  # [B, nP, QBr, 1]
    q_seg = L.q_seg.reshape(B, nQB, QBr)[:, pb][:, :, :, None]
    kv_idx = (ps[:, None] * S + jnp.arange(S, dtype=jnp.int32)[None, :])[None, :, None, :]  # [1, nP, 1, S]
    kv_seg = L.kv_seg.reshape(B, nS, S)[:, ps][:, :, None, :]  # [B, nP, 1, S]
    hit = jnp.any(visible(q_pos, q_seg, kv_idx, kv_seg, causal, window), axis=(2, 3))  # [B, nP]
    dest = jnp.where(hit, jnp.cumsum(hit, axis=1, dtype=jnp.int32) - 1, nP)
    pairs = jnp.arange(nP, dtype=jnp.int32)
    work = jax.vmap(lambda d: jnp.full((nP,), nP, jnp.int32).at[d].set(pairs, mode="drop"))(dest)
    return work, jnp.sum(hit, axis=1, dtype=jnp.int32)


def _take(x, idx, axis):
    """Per row: x [B, ...] (indexed along ``axis`` >= 1), idx [B, K] -> axis replaced by K."""
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=axis - 1, mode="clip"))(x, idx)


def _put(buf, dest, val):
    """Per row: buf [B, H, n, ...] gets val [B, H, K, ...] at dest [B, K] (out of range: dropped)."""
    return jax.vmap(lambda b, d, v: b.at[:, d].set(v, mode="drop"))(buf, dest, val)


def _over_visited_pairs(L: Layout, plan: BlockPlan, causal, window, split_size, pair_fn, bufs,
                        chunk: int | None = None):
    """Compute ``pair_fn`` on the visited pairs only, ``chunk`` per row per step of a
    ``fori_loop`` whose trip count is the largest row's visited count / chunk (dynamic);
    each output [B, H, K, ...] lands in ``bufs`` [B, H, nP+1, ...] at its plan index, so
    unvisited pairs keep the buffer's initial value (the fully masked split's).

    ``pair_fn(qp [B,H,K,QBr,D], kp [B,H,K,S,D], vp [B,H,K,S,Dv], mask [B,1,K,QBr,S],
    block [B,K]) -> tuple of [B,H,K,...]`` (the same views as :func:`_pair_views`)."""
    B, H, Rb, D = L.qs.shape
    nQB, nP, S = plan.by_block.shape[0], len(plan.pair_block), split_size
    QBr, nS, Dv = Rb // nQB, L.k.shape[2] // S, L.v.shape[-1]
    work, count = visited_pairs(L, plan, causal, window, split_size)
    K = max(1, min(int(PAIRS_PER_STEP if chunk is None else chunk), nP))
    work = pad_axis(work, 1, round_up(nP, K), nP)
    pb = jnp.asarray(np.append(plan.pair_block, 0).astype(np.int32))  # entry nP: a valid stand-in
    ps = jnp.asarray(np.append(plan.pair_split, 0).astype(np.int32))
    q_blocks = L.qs.reshape(B, H, nQB, QBr, D)
    k_splits, v_splits = L.k.reshape(B, H, nS, S, D), L.v.reshape(B, H, nS, S, Dv)
    q_pos, q_seg = L.q_pos.reshape(B, nQB, QBr), L.q_seg.reshape(B, nQB, QBr)
    kv_seg = L.kv_seg.reshape(B, nS, S)

    def body(t, bufs):
        w = lax.dynamic_slice_in_dim(work, t * K, K, axis=1)  # [B, K]
        blk, spl = pb[w], ps[w]
        qp, kp, vp = _take(q_blocks, blk, 2), _take(k_splits, spl, 2), _take(v_splits, spl, 2)
        kv_idx = (spl[:, :, None] * S + jnp.arange(S, dtype=jnp.int32))[:, None, :, None, :]
        mask = visible(_take(q_pos, blk, 1)[:, None, :, :, None], _take(q_seg, blk, 1)[:, None, :, :, None],
                       kv_idx, _take(kv_seg, spl, 1)[:, None, :, None, :], causal, window)
        dest = jnp.where(w < nP, w, nP + 1)
        return tuple(_put(b, dest, o) for b, o in zip(bufs, pair_fn(qp, kp, vp, mask, blk)))

    return lax.fori_loop(0, (jnp.max(count) + K - 1) // K, body, tuple(bufs))


def skipping_forward(L: Layout, plan: BlockPlan, causal, window, split_size, chunk: int | None = None):
    """:func:`blocked_forward` computing only the pairs with a visible key
    (:func:`visited_pairs`); the others keep the fully masked split's partials
    (c_s = NEG, l_s = 0, o_s = 0), so the fold gives the same bits."""
    B, H, Rb, _ = L.qs.shape
    nP, QBr, Dv = len(plan.pair_block), Rb // plan.by_block.shape[0], L.v.shape[-1]
    bufs = (jnp.full((B, H, nP + 1, QBr, 1), NEG, jnp.float32), jnp.zeros((B, H, nP + 1, QBr, 1), jnp.float32),
            jnp.zeros((B, H, nP + 1, QBr, Dv), jnp.float32))
    parts = _over_visited_pairs(L, plan, causal, window, split_size,
                                lambda qp, kp, vp, mask, blk: split_partials(_pair_scores(qp, kp), mask, vp),
                                bufs, chunk)
    return _fold_blocks(parts, plan, Rb)


def skipping_backward(L: Layout, plan: BlockPlan, causal, window, split_size, out, c, l, dout,
                      chunk: int | None = None):
    """:func:`_blocked_backward` computing only the pairs with a visible key; the others
    contribute exactly zero to dq, dk and dv."""
    B, H, Rb, D = L.qs.shape
    nQB, nP, S = plan.by_block.shape[0], len(plan.pair_block), split_size
    QBr, Dv = Rb // nQB, L.v.shape[-1]
    do, rl, di = _backward_inputs(out, l, dout)
    per_block = [x.reshape(B, H, nQB, QBr, x.shape[-1]) for x in (c, rl, di, do)]

    def pair_fn(qp, kp, vp, mask, blk):
        return _pair_grads(qp, kp, vp, mask, *(_take(x, blk, 2) for x in per_block))

    bufs = tuple(jnp.zeros((B, H, nP + 1, n, d), jnp.float32) for n, d in ((QBr, D), (S, D), (S, Dv)))
    return _fold_grads(_over_visited_pairs(L, plan, causal, window, split_size, pair_fn, bufs, chunk), plan, L)


def _forward(L: Layout, causal, window, split_size, impl, plan=None, data_skip=False):
    if impl == "pallas":
        return attention_forward(L, causal=causal, window=window, split_size=split_size)
    if plan is not None:
        if data_skip:
            return skipping_forward(L, plan, causal, window, split_size)
        return blocked_forward(L, plan, causal, window, split_size)
    return reference_forward(L, causal, window, split_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5, 6))
def _bi_attention(L: Layout, causal, window, split_size, impl, plan_key=None, data_skip=True):
    """out [B, H, R, Dv] f32; differentiable in ``L.qs``, ``L.k``, ``L.v`` (the int32
    fields get no cotangent). ``plan_key``: the :func:`block_plan` arguments of a full
    row (rows padded to whole query blocks), or ``None`` (every split). ``data_skip``
    (with a plan): also skip the plan's pairs without a visible key in this data
    (segment boundaries, padding; :func:`visited_pairs`); False computes every pair of
    the static plan (the previous computation, which the tests compare against)."""
    return _forward(L, causal, window, split_size, impl, _plan(plan_key), data_skip)[0]


def _plan(plan_key):
    return None if plan_key is None else block_plan(*plan_key)


def _bi_attention_fwd(L: Layout, causal, window, split_size, impl, plan_key=None, data_skip=True):
    out, c, l = _forward(L, causal, window, split_size, impl, _plan(plan_key), data_skip)
    return out, (L, out, c, l)


def _bi_attention_bwd(causal, window, split_size, impl, plan_key, data_skip, res, dout):
    L, out, c, l = res
    if plan_key is not None:
        backward = skipping_backward if data_skip else _blocked_backward
        dq, dk, dv = backward(L, _plan(plan_key), causal, window, split_size, out, c, l, dout)
        return (L._replace(qs=dq, k=dk, v=dv, q_pos=None, q_seg=None, kv_seg=None),)
    nS, k5, v5, mask = _split_views(L, split_size, causal, window)
    B, H, R, D = L.qs.shape
    do = dout.astype(jnp.float32)
    s = _scores(L.qs, k5, nS)
    rl = (1.0 / jnp.where(l > 0, l, 1.0))[:, :, None]  # [B, H, 1, R, 1]
    p = jnp.where(mask, jnp.exp2(s - c[:, :, None]) * rl, 0.0)  # softmax probabilities [B, H, nS, R, S]
    di = _backward_inputs(out, l, dout)[2][:, :, None]  # [B, H, 1, R, 1]
    dob = jnp.broadcast_to(do[:, :, None], (B, H, nS, R, do.shape[-1]))
    qb = jnp.broadcast_to(L.qs[:, :, None], (B, H, nS, R, D))
    batch = ((0, 1, 2), (0, 1, 2))
    dv5 = lax.dot_general(p, dob, (((3,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    dp = lax.dot_general(dob, v5, (((4,), (4,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    ds = p * (dp - di) * LN2  # gradient w.r.t. the base-2 scores
    dq_parts = lax.dot_general(ds, k5, (((4,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    dk5 = lax.dot_general(ds, qb, (((3,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    dq = ordered_sum(dq_parts, 2)  # over the splits, left to right
    return (L._replace(qs=dq, k=dk5.reshape(L.k.shape), v=dv5.reshape(L.v.shape), q_pos=None, q_seg=None, kv_seg=None),)


_bi_attention.defvjp(_bi_attention_fwd, _bi_attention_bwd)


def _standard(q, k, v, q_positions, q_segment_ids, kv_segment_ids, kv_lengths, causal, window, scale):
    B, Tq, Hq, D = q.shape
    _, Tk, Hkv, _ = k.shape
    G = Hq // Hkv
    q_positions, q_segment_ids, kv_segment_ids, kv_lengths = fill_defaults(
        B, Tq, Tk, q_positions, q_segment_ids, kv_segment_ids, kv_lengths)
    slot = jnp.arange(Tk, dtype=jnp.int32)
    kv_seg = jnp.where(slot[None] < kv_lengths[:, None], kv_segment_ids, SEGMENT_SENTINEL)
    mask = visible(q_positions[:, :, None], q_segment_ids[:, :, None], slot[None, None, :], kv_seg[:, None, :], causal, window)
    qg = q.astype(jnp.float32).reshape(B, Tq, Hkv, G, D)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32)) * scale
    m = mask[:, None, None]
    p = jax.nn.softmax(jnp.where(m, s, NEG), axis=-1)
    p = jnp.where(m.any(-1, keepdims=True), p, 0.0)
    o = jnp.einsum("bhgts,bshd->bthgd", p, v.astype(jnp.float32))
    return o.reshape(B, Tq, Hq, D).astype(q.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
    split_size: int = SPLIT_SIZE,
    mode: str | None = None,
    impl: str | None = None,
) -> jax.Array:
    """Masked grouped-query attention; see the module docstring for shapes and masking."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = None if sliding_window is None else int(sliding_window)
    if resolve_mode(mode) == "standard":
        return _standard(q, k, v, q_positions, q_segment_ids, kv_segment_ids, kv_lengths, bool(causal), window, scale)
    L = prepare(q, k, v, q_positions, q_segment_ids, kv_segment_ids, kv_lengths, scale, split_size)
    plan_key = None
    if q_positions is None:  # a full row (queries on the last Tq slots): skip splits statically
        _, Tq, Hq, _ = q.shape
        G = Hq // k.shape[2]
        L = _pad_rows(L, round_up(max(Tq, 1), QUERY_BLOCK) * G)
        plan_key = (Tq, k.shape[1] - Tq, L.k.shape[2], bool(causal), window, int(split_size), True)
    out = _bi_attention(L, bool(causal), window, int(split_size), resolve_impl(impl), plan_key)
    return unprepare(out, q.shape, q.dtype)


def _pad_rows(L: Layout, rows: int) -> Layout:
    """Pad the query rows to ``rows`` with rows that see no key."""
    if L.qs.shape[2] >= rows:
        return L
    return L._replace(qs=pad_axis(L.qs, 2, rows), q_pos=pad_axis(L.q_pos, 1, rows),
                      q_seg=pad_axis(L.q_seg, 1, rows, PAD_QUERY_SEGMENT))
