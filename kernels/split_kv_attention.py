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

The backward pass is a ``custom_vjp`` over the same splits (flash-attention style
recomputation of ``p`` from the saved ``(c, l)``): ``dq`` per query is summed over
splits left to right (batch-invariant), ``dk``/``dv`` contract over the query rows in
one GEMM per split (deterministic run to run).

``standard``: dense scores ``q k^T`` over all keys, ``jax.nn.softmax``, ``p v``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .mode import resolve_impl, resolve_mode
from .tiling import LANES, SPLIT_SIZE, pad_axis, pairwise_sum, round_up, upcast

NEG = -1e30  # finite "minus infinity" for masked scores
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
FLUSH_EXP = -64  # rescale factors below 2^FLUSH_EXP are flushed to 0 (keeps products exact)
SEGMENT_SENTINEL = jnp.iinfo(jnp.int32).min
PAD_QUERY_SEGMENT = SEGMENT_SENTINEL + 1  # segment id of padding query rows: they see no key
MIN_ROWS = 2  # query rows per KV head are padded to at least this many: XLA:CPU computes the
#               q.k^T GEMM of a single row as a GEMV with another accumulation order
MIN_PV_COLS = 64  # v's head dim is zero-padded to at least this (XLA:CPU GEMMs with < 64 columns
#                   pick a different accumulation order for one-row problems)
_HIGHEST = lax.Precision.HIGHEST


class Layout(NamedTuple):
    """Inputs rearranged to the kernel layout (rows r = t * G + g per KV head, padded
    to at least ``MIN_ROWS`` with rows that see no key).

    qs [B, Hkv, R, D] f32 (already scaled by ``scale * log2 e``), k [B, Hkv, Tkp, D] f32 (Tkp = Tk rounded
    up to the split size), v [B, Hkv, Tkp, Dv] f32 (Dv = max(D, MIN_PV_COLS), zero
    columns), q_pos / q_seg [B, R] int32, kv_seg [B, Tkp] int32 with invalid slots set
    to ``SEGMENT_SENTINEL``.
    """

    qs: jax.Array
    k: jax.Array
    v: jax.Array
    q_pos: jax.Array
    q_seg: jax.Array
    kv_seg: jax.Array


def fill_defaults(B, Tq, Tk, q_positions, q_segment_ids, kv_segment_ids, kv_lengths):
    """The masking arguments both modes share, defaulted: queries on the last Tq slots,
    one segment, every KV slot valid."""
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(Tq, dtype=jnp.int32) + (Tk - Tq), (B, Tq))
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((B, Tq), jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = jnp.zeros((B, Tk), jnp.int32)
    if kv_lengths is None:
        kv_lengths = jnp.full((B,), Tk, jnp.int32)
    return q_positions, q_segment_ids, kv_segment_ids, kv_lengths


def prepare(q, k, v, q_positions, q_segment_ids, kv_segment_ids, kv_lengths, scale, split_size) -> Layout:
    B, Tq, Hq, D = q.shape
    Bk, Tk, Hkv, Dk = k.shape
    if Bk != B or Dk != D or v.shape != k.shape or Hq % Hkv:
        raise ValueError(f"attention shapes: q {q.shape}, k {k.shape}, v {v.shape}")
    G = Hq // Hkv
    q_positions, q_segment_ids, kv_segment_ids, kv_lengths = fill_defaults(
        B, Tq, Tk, q_positions, q_segment_ids, kv_segment_ids, kv_lengths)
    Tkp = round_up(max(Tk, 1), split_size)

    qf = upcast(q).astype(jnp.float32) * jnp.float32(scale * LOG2E)
    qs = qf.reshape(B, Tq, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, Tq * G, D)
    kf = pad_axis(upcast(k).astype(jnp.float32).transpose(0, 2, 1, 3), 2, Tkp)
    vf = pad_axis(upcast(v).astype(jnp.float32).transpose(0, 2, 1, 3), 2, Tkp)
    vf = pad_axis(vf, 3, max(D, MIN_PV_COLS))
    q_pos = jnp.repeat(jnp.asarray(q_positions, jnp.int32), G, axis=1)
    q_seg = jnp.repeat(jnp.asarray(q_segment_ids, jnp.int32), G, axis=1)
    Rp = max(Tq * G, MIN_ROWS)
    qs = pad_axis(qs, 2, Rp)
    q_pos = pad_axis(q_pos, 1, Rp)
    q_seg = pad_axis(q_seg, 1, Rp, PAD_QUERY_SEGMENT)
    slot = jnp.arange(Tkp, dtype=jnp.int32)[None, :]
    kv_seg = pad_axis(jnp.asarray(kv_segment_ids, jnp.int32), 1, Tkp)
    valid = slot < jnp.asarray(kv_lengths, jnp.int32)[:, None]
    kv_seg = jnp.where(valid, kv_seg, SEGMENT_SENTINEL)
    return Layout(qs, kf, vf, q_pos, q_seg, kv_seg)


def unprepare(out: jax.Array, q_shape, dtype) -> jax.Array:
    """out [B, Hkv, Rp, Dv] -> [B, Tq, Hq, D]."""
    B, Tq, Hq, D = q_shape
    Hkv = out.shape[1]
    out = out[:, :, : Tq * (Hq // Hkv), :D]
    G = Hq // Hkv
    return out.reshape(B, Hkv, Tq, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Tq, Hq, D).astype(dtype)


def visible(q_pos, q_seg, kv_idx, kv_seg, causal: bool, window: int | None):
    """Mask of visible keys; broadcasting int arrays (query side [.., R, 1], key side [.., 1, S])."""
    m = q_seg == kv_seg
    if causal:
        m = m & (kv_idx <= q_pos)
    if window is not None:
        m = m & (q_pos - kv_idx < window)
        if not causal:
            m = m & (kv_idx - q_pos < window)
    return m


def split_partials(s, mask, v_split, sum_fn=None):
    """One split's partials. s (base-2 scores), mask [..., R, S]; v_split [..., S, Dv] ->
    c_s [..., R, 1] (integer-valued), l_s [..., R, 1], o_s [..., R, Dv]."""
    sum_fn = sum_fn or (lambda p: pairwise_sum(p, -1, keepdims=True))
    s = jnp.where(mask, s, NEG)
    c_s = jnp.ceil(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp2(s - c_s), 0.0)
    l_s = sum_fn(p)
    nb = p.ndim - 2
    o_s = lax.dot_general(
        p, v_split, (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))),
        precision=_HIGHEST, preferred_element_type=jnp.float32,
    )
    return c_s, l_s, o_s


def init_state(rows_shape, dv):
    """(c, l, o) before the first split: c [..., R, 1] = NEG, l = 0, o [..., R, Dv] = 0."""
    return (
        jnp.full(rows_shape + (1,), NEG, jnp.float32),
        jnp.zeros(rows_shape + (1,), jnp.float32),
        jnp.zeros(rows_shape + (dv,), jnp.float32),
    )


def pow2_factor(d):
    """2^d for integer-valued d <= 0, built from bits (exact); 0 where d < FLUSH_EXP."""
    dd = jnp.maximum(d, float(FLUSH_EXP)).astype(jnp.int32)
    f = lax.bitcast_convert_type(lax.shift_left(dd + 127, jnp.int32(23)), jnp.float32)
    return jnp.where(d < FLUSH_EXP, 0.0, f)


def combine(state, c_s, l_s, o_s):
    """Fold one split's partials into the running (c, l, o), left to right.

    c, l, c_s, l_s [..., R, 1]; o, o_s [..., R, Dv]. Both rescale factors are exact
    powers of two, so ``x * f`` is exact and ``x*f + y*g`` has one rounding whether
    or not the compiler formed an FMA.
    """
    c, l, o = state
    c_new = jnp.maximum(c, c_s)
    fa = pow2_factor(c - c_new)
    fb = pow2_factor(c_s - c_new)
    return c_new, l * fa + l_s * fb, o * fa + o_s * fb


def finalize(state):
    """(c, l, o) -> (out [..., R, Dv], c [..., R, 1], l [..., R, 1]); out = 0 where l = 0."""
    c, l, o = state
    has = l > 0
    rl = 1.0 / jnp.where(has, l, 1.0)
    return jnp.where(has, o * rl, 0.0), c, l


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


def _forward(L: Layout, causal, window, split_size, impl):
    if impl == "pallas":
        from .pallas.attention_kernel import attention_forward

        return attention_forward(L, causal=causal, window=window, split_size=split_size)
    return reference_forward(L, causal, window, split_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _bi_attention(qs, k, v, q_pos, q_seg, kv_seg, causal, window, split_size, impl):
    return _forward(Layout(qs, k, v, q_pos, q_seg, kv_seg), causal, window, split_size, impl)[0]


def _bi_attention_fwd(qs, k, v, q_pos, q_seg, kv_seg, causal, window, split_size, impl):
    out, c, l = _forward(Layout(qs, k, v, q_pos, q_seg, kv_seg), causal, window, split_size, impl)
    return out, (qs, k, v, q_pos, q_seg, kv_seg, out, c, l)


def _bi_attention_bwd(causal, window, split_size, impl, res, dout):
    qs, k, v, q_pos, q_seg, kv_seg, out, c, l = res
    L = Layout(qs, k, v, q_pos, q_seg, kv_seg)
    nS, k5, v5, mask = _split_views(L, split_size, causal, window)
    B, H, R, D = qs.shape
    do = dout.astype(jnp.float32)
    s = _scores(qs, k5, nS)
    rl = (1.0 / jnp.where(l > 0, l, 1.0))[:, :, None]  # [B, H, 1, R, 1]
    p = jnp.where(mask, jnp.exp2(s - c[:, :, None]) * rl, 0.0)  # softmax probabilities [B, H, nS, R, S]
    di = pairwise_sum(do * out, -1, keepdims=True)[:, :, None]  # [B, H, 1, R, 1]
    dob = jnp.broadcast_to(do[:, :, None], (B, H, nS, R, do.shape[-1]))
    qb = jnp.broadcast_to(qs[:, :, None], (B, H, nS, R, D))
    batch = ((0, 1, 2), (0, 1, 2))
    dv5 = lax.dot_general(p, dob, (((3,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    dp = lax.dot_general(dob, v5, (((4,), (4,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    ds = p * (dp - di) * LN2  # gradient w.r.t. the base-2 scores
    dq_parts = lax.dot_general(ds, k5, (((4,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    dk5 = lax.dot_general(ds, qb, (((3,), (3,)), batch), precision=_HIGHEST, preferred_element_type=jnp.float32)
    dq = dq_parts[:, :, 0]
    for j in range(1, nS):
        dq = dq + dq_parts[:, :, j]
    return dq, dk5.reshape(k.shape), dv5.reshape(v.shape), None, None, None


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
    out = _bi_attention(L.qs, L.k, L.v, L.q_pos, L.q_seg, L.kv_seg, bool(causal), window, int(split_size), resolve_impl(impl))
    return unprepare(out, q.shape, q.dtype)
