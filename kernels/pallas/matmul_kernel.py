"""Pallas matmul: fixed row tiles, canonical K chunks, no split-K.

``matmul(x [M, K], w [K, N]) -> [M, N]`` (float32 accumulation, ``out_dtype``).

Grid ``(M / block_m, N / block_n)``; each program owns one ``block_m x block_n``
output tile and walks the contraction in the canonical chunks of
:func:`tml.kernels.tiling.chunk_bounds` (``k_chunk``), adding chunk products left to
right — the algorithm of :mod:`tml.kernels.tiled_matmul`. A row's bits therefore depend only
on (block_m, k_chunk), not on M.

Operand dtype inside the kernel: in interpret mode the blocks are upcast to float32
before the dot, exactly like the jnp reference (XLA:CPU's bf16 x bf16 -> f32 GEMM uses
another accumulation order than its f32 GEMM). Compiled for TPU/GPU, bf16 blocks are
fed to the MXU / tensor cores as bf16 with float32 accumulation (``upcast=False``):
products of bf16 values are exact in float32 either way, so only the hardware's
in-chunk accumulation order differs, which is fixed per tile shape.

Any shape is accepted; the flavours differ in how a shape is made to fit:

* ``tpu`` wants ``block_n`` a multiple of 128 or the full N; the K block is the full K
  (allowed by the (8, 128) rule for a full dimension), so no padding of K is needed.
* ``triton`` wants every value it loads to be a power-of-two block of at least 16
  (``tl.dot``), so N is padded to ``block_n`` and the contraction is **zero-padded
  per chunk** (:func:`padded_chunks`): the canonical chunks of ``k_chunk`` stay where
  they are and only the last, shorter one is padded up to the next power of two >= 16
  (the hMLP's K = 300 -> 512, 75 -> 128, 9,600 = 18 x 512 + 384 -> 18 x 512 + 512;
  the backward's ``dw = x.T @ dy`` contracts over the row count, whose last chunk is
  any size). Zero padding of a contraction is exact: each padded term is ``0 * 0``
  and ``acc + 0 = acc`` (the one exception, a sum of only negative zeros turning into
  ``+0``, cannot change a later non-zero result). The chunk bounds — hence the
  reduction order — are a function of (K, k_chunk) only, never of the row count, and in
  interpret mode the padded kernel equals the unpadded jnp reference bit for bit
  (XLA:CPU accumulates a chunk of <= 512 as one sequential FMA chain, into which
  trailing zero products add nothing; ``tests/kernels/test_pallas.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..tiling import K_CHUNK, ROW_TILE, chunk_bounds, next_pow2, pad_axis, round_up
from . import common


def _kernel(x_ref, w_ref, o_ref, *, chunks, upcast):
    acc = None
    for k0, k1 in chunks:
        xa = x_ref[:, k0:k1]
        wa = w_ref[k0:k1, :]
        if upcast:
            xa, wa = xa.astype(jnp.float32), wa.astype(jnp.float32)
        part = jnp.dot(xa, wa, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    o_ref[...] = acc.astype(o_ref.dtype)


TRITON_MIN_DOT = 16  # tl.dot wants every dimension >= 16 (and a power of two)


def padded_chunks(K: int, k_chunk: int) -> tuple[tuple[tuple[int, int], ...], int]:
    """Triton-flavour contraction layout: (chunk bounds, padded K).

    The canonical chunks of :func:`~tml.kernels.tiling.chunk_bounds` with the last one
    extended to ``next_pow2(max(size, 16))`` (zeros beyond K). ``k_chunk`` must itself be
    a power of two >= 16 so that the full chunks fit unchanged. E.g. K = 9,600,
    k_chunk = 512 -> 19 chunks, padded K 9,728.
    """
    if k_chunk < TRITON_MIN_DOT or k_chunk != next_pow2(k_chunk):
        raise ValueError(f"the triton flavour needs k_chunk a power of two >= {TRITON_MIN_DOT}; got {k_chunk} "
                         f"(use e.g. k_chunk=512, the library's K_CHUNK)")
    chunks = list(chunk_bounds(K, k_chunk))
    k0, k1 = chunks[-1]
    chunks[-1] = (k0, k0 + next_pow2(max(k1 - k0, TRITON_MIN_DOT)))
    return tuple(chunks), chunks[-1][1]


def _block_n(N: int, flavour: str, block_n: int | None, interpret: bool) -> int:
    """Output columns per program. Column tiling never changes which products an output
    sums nor their order in the algorithm, but in interpret mode XLA:CPU's GEMM (which
    runs each block) picks its per-column accumulation from the block width: with N not a
    multiple of 64, columns computed in a 64-wide block differed from the same columns of
    the reference's N-wide GEMM (measured: N = 40, 75, 96). So the interpreted Triton
    flavour takes the whole N as one block then; compiled, Triton needs a power of two."""
    if block_n is not None:
        return block_n
    if flavour == "triton":
        if interpret and N % 64:
            return N
        return min(64, next_pow2(N))
    return 128 if N % 128 == 0 else N


def matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    flavour: str | None = None,
    interpret: bool | None = None,
    block_m: int = ROW_TILE,
    block_n: int | None = None,
    k_chunk: int = K_CHUNK,
    out_dtype=None,
    upcast: bool | None = None,
) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N]; see the module docstring."""
    flavour, interpret = common.resolve(flavour, interpret)
    M, K = x.shape
    K2, N = w.shape
    if K != K2:
        raise ValueError(f"contraction mismatch: {x.shape} @ {w.shape}")
    out_dtype = jnp.result_type(x.dtype, w.dtype) if out_dtype is None else out_dtype
    upcast = interpret if upcast is None else upcast
    if flavour == "triton":
        chunks, Kp = padded_chunks(K, k_chunk)
    else:
        chunks, Kp = tuple(chunk_bounds(K, k_chunk)), K
    bn = _block_n(N, flavour, block_n, interpret)
    Mp, Np = round_up(max(M, 1), block_m), round_up(N, bn)
    xp = pad_axis(pad_axis(x, 0, Mp), 1, Kp)
    wp = pad_axis(pad_axis(w, 1, Np), 0, Kp)
    kernel = functools.partial(_kernel, chunks=chunks, upcast=upcast)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // block_m, Np // bn),
        in_specs=[
            pl.BlockSpec((block_m, Kp), lambda i, j: (i, 0)),
            pl.BlockSpec((Kp, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, bn), lambda i, j: (i, j)),
        compiler_params=common.compiler_params(flavour, ("parallel", "parallel")),
        interpret=interpret,
        name="tml_bi_matmul",
    )(xp, wp)
    return out[:M, :N]
