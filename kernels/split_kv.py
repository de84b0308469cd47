"""The split-KV attention pieces shared by the jnp reference
(:mod:`tml.kernels.split_kv_attention`) and the Pallas kernel
(:mod:`tml.kernels.pallas.attention_kernel`): the kernel layout, the mask, one split's
partials and the left-to-right combine. Both implementations call these same
functions, so their arithmetic is the same op for op; the algorithm and why it is
batch-invariant are described in :mod:`tml.kernels.split_kv_attention`.

Shapes (kernel layout, query rows r = t * G + g per KV head)::

    prepare(q [B,Tq,Hq,D], k, v [B,Tk,Hkv,D], masking args, scale, split_size) -> Layout
    unprepare(out [B,Hkv,R,Dv], q.shape, dtype) -> [B,Tq,Hq,D]
    split_partials(s, mask [..., R, S], v [..., S, Dv]) -> c_s, l_s [..., R, 1], o_s [..., R, Dv]
    combine((c, l, o), c_s, l_s, o_s) -> (c, l, o);  finalize((c, l, o)) -> out, c, l

This module imports nothing from the kernels but :mod:`tml.kernels.tiling`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .tiling import pad_axis, pairwise_sum, round_up, upcast

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
    # A NamedTuple is a pytree: the attention custom_vjp takes and saves one Layout;
    # its backward returns a Layout of cotangents with None for the int32 fields.


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


def prepare_queries(q, q_positions, q_segment_ids, n_kv_heads: int, scale: float):
    """The query half of :func:`prepare` (shared with :mod:`tml.kernels.paged_attention`):
    q [B,Tq,Hq,D], q_positions / q_segment_ids [B,Tq] (given, not ``None``) ->
    qs [B,Hkv,R,D] f32 scaled by ``scale * log2 e``, q_pos, q_seg [B,R] int32
    (R = max(Tq * G, MIN_ROWS); padding rows carry ``PAD_QUERY_SEGMENT``)."""
    B, Tq, Hq, D = q.shape
    G = Hq // n_kv_heads
    qf = upcast(q).astype(jnp.float32) * jnp.float32(scale * LOG2E)
    qs = qf.reshape(B, Tq, n_kv_heads, G, D).transpose(0, 2, 1, 3, 4).reshape(B, n_kv_heads, Tq * G, D)
    q_pos = jnp.repeat(jnp.asarray(q_positions, jnp.int32), G, axis=1)
    q_seg = jnp.repeat(jnp.asarray(q_segment_ids, jnp.int32), G, axis=1)
    Rp = max(Tq * G, MIN_ROWS)
    qs = pad_axis(qs, 2, Rp)
    q_pos = pad_axis(q_pos, 1, Rp)
    q_seg = pad_axis(q_seg, 1, Rp, PAD_QUERY_SEGMENT)
    return qs, q_pos, q_seg


def prepare(q, k, v, q_positions, q_segment_ids, kv_segment_ids, kv_lengths, scale, split_size) -> Layout:
    """q [B,Tq,Hq,D], k, v [B,Tk,Hkv,D] and the masking arguments of
    :func:`tml.kernels.attention` (``None`` = default) -> :class:`Layout`."""
    B, Tq, Hq, D = q.shape
    Bk, Tk, Hkv, Dk = k.shape
    if Bk != B or Dk != D or v.shape != k.shape or Hq % Hkv:
        raise ValueError(f"attention shapes: q {q.shape}, k {k.shape}, v {v.shape}")
    q_positions, q_segment_ids, kv_segment_ids, kv_lengths = fill_defaults(
        B, Tq, Tk, q_positions, q_segment_ids, kv_segment_ids, kv_lengths)
    Tkp = round_up(max(Tk, 1), split_size)

    qs, q_pos, q_seg = prepare_queries(q, q_positions, q_segment_ids, Hkv, scale)
    kf = pad_axis(upcast(k).astype(jnp.float32).transpose(0, 2, 1, 3), 2, Tkp)
    vf = pad_axis(upcast(v).astype(jnp.float32).transpose(0, 2, 1, 3), 2, Tkp)
    vf = pad_axis(vf, 3, max(D, MIN_PV_COLS))
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
