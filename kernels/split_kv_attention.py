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

This module is the API, the jnp reference forward and the ``custom_vjp``; the pieces it
shares with the Pallas forward (:mod:`tml.kernels.pallas.attention_kernel`) — the
kernel :class:`~tml.kernels.split_kv.Layout`, the mask, one split's partials, the
combine — are in :mod:`tml.kernels.split_kv`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .mode import resolve_impl, resolve_mode
from .pallas.attention_kernel import attention_forward
from .split_kv import (
    LN2,
    NEG,
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
from .tiling import LANES, SPLIT_SIZE, ordered_sum, pad_axis, pairwise_sum, round_up

_HIGHEST = lax.Precision.HIGHEST


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
        return attention_forward(L, causal=causal, window=window, split_size=split_size)
    return reference_forward(L, causal, window, split_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _bi_attention(L: Layout, causal, window, split_size, impl):
    """out [B, H, R, Dv] f32; differentiable in ``L.qs``, ``L.k``, ``L.v`` (the int32
    fields get no cotangent)."""
    return _forward(L, causal, window, split_size, impl)[0]


def _bi_attention_fwd(L: Layout, causal, window, split_size, impl):
    out, c, l = _forward(L, causal, window, split_size, impl)
    return out, (L, out, c, l)


def _bi_attention_bwd(causal, window, split_size, impl, res, dout):
    L, out, c, l = res
    nS, k5, v5, mask = _split_views(L, split_size, causal, window)
    B, H, R, D = L.qs.shape
    do = dout.astype(jnp.float32)
    s = _scores(L.qs, k5, nS)
    rl = (1.0 / jnp.where(l > 0, l, 1.0))[:, :, None]  # [B, H, 1, R, 1]
    p = jnp.where(mask, jnp.exp2(s - c[:, :, None]) * rl, 0.0)  # softmax probabilities [B, H, nS, R, S]
    di = pairwise_sum(do * out, -1, keepdims=True)[:, :, None]  # [B, H, 1, R, 1]
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
    out = _bi_attention(L, bool(causal), window, int(split_size), resolve_impl(impl))
    return unprepare(out, q.shape, q.dtype)
