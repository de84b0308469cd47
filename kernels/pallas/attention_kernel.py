"""Pallas split-KV attention (forward): the algorithm of :mod:`tml.kernels.split_kv_attention`.

Input is the kernel layout :class:`tml.kernels.split_kv.Layout` (query rows
r = t * G + g per KV head, already scaled):

    qs [B, H, R, D], k [B, H, Tkp, D], v [B, H, Tkp, Dv], q_pos/q_seg [B, R], kv_seg [B, Tkp]
    -> out [B, H, R, Dv] float32, c [B, H, R, 1], l [B, H, R, 1] (final shift and sum)

One program per (batch, KV head, block of ``BLOCK_Q`` query rows). The program walks
the KV splits of ``split_size`` slots from slot 0 upward and folds each split's
partials (max, pairwise-tree sum, exp(s - max) @ v) into the running (m, l, o) with
:func:`tml.kernels.split_kv.combine` — the same helper functions the jnp reference
calls, so the arithmetic is the same op for op. This backend imports the shared pieces
(:mod:`tml.kernels.split_kv`), never the API module that calls it.

* ``BLOCK_Q = 64`` query rows per program, a constant: the rows are padded to whole
  blocks (with rows that see no key), so a decode step, a prefill chunk and a training
  row run the same per-row program and reduction order (it used to be derived from the
  row count: 16 rows for decode, 64 for training, issue 11).
* ``tpu`` flavour: the split index is the last grid axis ("arbitrary"), the running
  (c, l, o) live in VMEM scratch; blocks obey the (8, 128) rule (segment ids are
  passed as [B, R, 1] and [B, nS, 1, S]).
* ``triton`` flavour: the splits are a ``fori_loop`` inside the program with the
  running state in registers; the KV length is padded to a power of two (the extra
  splits are fully masked and skipped).

Not implemented as Pallas: the backward pass (``attention``'s ``custom_vjp`` runs the
jnp backward, which visits only the (query block, split) pairs with a visible key) and
skipping of fully masked splits in this forward, static (causal, window) or from the
data (segments, padding): every split is computed, and a fully masked one leaves
(c, l, o) bit for bit unchanged, so the bits are those of the skipping jnp forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..split_kv import (
    NEG,
    PAD_QUERY_SEGMENT,
    SEGMENT_SENTINEL,
    Layout,
    combine,
    finalize,
    init_state,
    split_partials,
    visible,
)
from ..tiling import next_pow2, pad_axis, round_up
from . import common

_SQ = pl.squeezed if hasattr(pl, "squeezed") else None
BLOCK_Q = 64  # query rows per program: a constant, never derived from the row count


def _split(q, k, v, qpos, qseg, kvseg, kv0, S, causal, window, sum_fn):
    """q [bq, D], k [S, D], v [S, Dv], qpos/qseg [bq, 1], kvseg [1, S] -> partials."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    kv_idx = kv0 + lax.broadcasted_iota(jnp.int32, (1, S), 1)
    mask = visible(qpos, qseg, kv_idx, kvseg, causal, window)
    return split_partials(s, mask, v, sum_fn)


def _tpu_kernel(
    qpos_ref, qseg_ref, kvseg_ref, q_ref, k_ref, v_ref, o_ref, c_ref, l_ref, c_sc, l_sc, o_sc, *, S, nS, causal, window, sum_fn
):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        c_sc[...] = jnp.full(c_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        o_sc[...] = jnp.zeros(o_sc.shape, jnp.float32)

    parts = _split(
        q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], qpos_ref[0], qseg_ref[0], kvseg_ref[0, 0], j * S, S, causal, window, sum_fn
    )
    c, l, o = combine((c_sc[...], l_sc[...], o_sc[...]), *parts)
    c_sc[...] = c
    l_sc[...] = l
    o_sc[...] = o

    @pl.when(j == nS - 1)
    def _finish():
        out, c_fin, l_fin = finalize((c_sc[...], l_sc[...], o_sc[...]))
        o_ref[0, 0] = out
        c_ref[0, 0] = c_fin
        l_ref[0, 0] = l_fin


def _triton_kernel(
    qpos_ref, qseg_ref, kvseg_ref, q_ref, k_ref, v_ref, o_ref, c_ref, l_ref, *, S, nS, causal, window, sum_fn, bq, dv
):
    q = q_ref[...]
    qpos = qpos_ref[...][:, None]
    qseg = qseg_ref[...][:, None]

    def body(j, state):
        start = pl.multiple_of(j * S, S)
        k = k_ref[pl.ds(start, S), :]
        v = v_ref[pl.ds(start, S), :]
        kvseg = kvseg_ref[pl.ds(start, S)][None, :]
        return combine(state, *_split(q, k, v, qpos, qseg, kvseg, start, S, causal, window, sum_fn))

    out, c, l = finalize(lax.fori_loop(0, nS, body, init_state((bq,), dv)))
    o_ref[...] = out
    c_ref[...] = c
    l_ref[...] = l


def attention_forward(
    L: Layout,
    *,
    causal: bool = True,
    window: int | None = None,
    split_size: int = 64,
    flavour: str | None = None,
    interpret: bool | None = None,
):
    """Split-KV attention on the kernel layout -> (out [B,H,R,Dv], c [B,H,R,1], l [B,H,R,1])."""
    flavour, interpret = common.resolve(flavour, interpret)
    B, H, R, D = L.qs.shape
    Tkp, Dv = L.k.shape[2], L.v.shape[3]
    S = split_size
    if Tkp % S:
        raise ValueError("kv length must be padded to the split size (use tml.kernels.split_kv.prepare)")
    bq = BLOCK_Q
    Rp = round_up(max(R, 1), bq)
    qs = pad_axis(L.qs, 2, Rp)
    q_pos = pad_axis(L.q_pos, 1, Rp)
    q_seg = pad_axis(L.q_seg, 1, Rp, PAD_QUERY_SEGMENT)
    sum_fn = functools.partial(common.row_sum, flavour=flavour, interpret=interpret)
    out_shape = (
        jax.ShapeDtypeStruct((B, H, Rp, Dv), jnp.float32),
        jax.ShapeDtypeStruct((B, H, Rp, 1), jnp.float32),
        jax.ShapeDtypeStruct((B, H, Rp, 1), jnp.float32),
    )

    if flavour == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        nS = Tkp // S
        kernel = functools.partial(_tpu_kernel, S=S, nS=nS, causal=causal, window=window, sum_fn=sum_fn)
        out, c, l = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(B, H, Rp // bq, nS),
            in_specs=[
                pl.BlockSpec((1, bq, 1), lambda b, h, i, j: (b, i, 0)),
                pl.BlockSpec((1, bq, 1), lambda b, h, i, j: (b, i, 0)),
                pl.BlockSpec((1, 1, 1, S), lambda b, h, i, j: (b, j, 0, 0)),
                pl.BlockSpec((1, 1, bq, D), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((1, 1, S, D), lambda b, h, i, j: (b, h, j, 0)),
                pl.BlockSpec((1, 1, S, Dv), lambda b, h, i, j: (b, h, j, 0)),
            ],
            out_specs=[
                pl.BlockSpec((1, 1, bq, Dv), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((1, 1, bq, 1), lambda b, h, i, j: (b, h, i, 0)),
                pl.BlockSpec((1, 1, bq, 1), lambda b, h, i, j: (b, h, i, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, Dv), jnp.float32),
            ],
            compiler_params=common.compiler_params(flavour, ("parallel", "parallel", "parallel", "arbitrary")),
            interpret=interpret,
            name="tml_bi_attention",
        )(
            q_pos[..., None],
            q_seg[..., None],
            L.kv_seg.reshape(B, nS, 1, S),
            qs,
            L.k,
            L.v,
        )
    else:
        for name, n in (("head dim", D), ("v head dim", Dv), ("split size", S)):
            if n != next_pow2(n) or n < 16:
                raise NotImplementedError(f"triton flavour needs a power-of-two {name} >= 16, got {n}")
        T2 = next_pow2(Tkp)
        k = pad_axis(L.k, 2, T2)
        v = pad_axis(L.v, 2, T2)
        kv_seg = pad_axis(L.kv_seg, 1, T2, SEGMENT_SENTINEL)
        kernel = functools.partial(
            _triton_kernel, S=S, nS=Tkp // S, causal=causal, window=window, sum_fn=sum_fn, bq=bq, dv=Dv
        )
        sq = _SQ
        out, c, l = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(B, H, Rp // bq),
            in_specs=[
                pl.BlockSpec((sq, bq), lambda b, h, i: (b, i)),
                pl.BlockSpec((sq, bq), lambda b, h, i: (b, i)),
                pl.BlockSpec((sq, T2), lambda b, h, i: (b, 0)),
                pl.BlockSpec((sq, sq, bq, D), lambda b, h, i: (b, h, i, 0)),
                pl.BlockSpec((sq, sq, T2, D), lambda b, h, i: (b, h, 0, 0)),
                pl.BlockSpec((sq, sq, T2, Dv), lambda b, h, i: (b, h, 0, 0)),
            ],
            out_specs=[
                pl.BlockSpec((sq, sq, bq, Dv), lambda b, h, i: (b, h, i, 0)),
                pl.BlockSpec((sq, sq, bq, 1), lambda b, h, i: (b, h, i, 0)),
                pl.BlockSpec((sq, sq, bq, 1), lambda b, h, i: (b, h, i, 0)),
            ],
            compiler_params=common.compiler_params(flavour),
            interpret=interpret,
            name="tml_bi_attention",
        )(q_pos, q_seg, kv_seg, qs, k, v)
    return out[:, :, :R], c[:, :, :R], l[:, :, :R]
