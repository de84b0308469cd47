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

Flavour constraints: ``tpu`` wants ``block_n`` a multiple of 128 or the full N (N is
padded); ``triton`` wants power-of-two blocks, so N is padded to ``block_n`` and every
K chunk (including the last) must be a power of two.
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


def _block_n(N: int, flavour: str, block_n: int | None) -> int:
    if block_n is not None:
        return block_n
    if flavour == "triton":
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
    chunks = tuple(chunk_bounds(K, k_chunk))
    if flavour == "triton":
        bad = [b - a for a, b in chunks if (b - a) != next_pow2(b - a) or (b - a) < 16]
        if bad:
            raise NotImplementedError(f"triton flavour needs power-of-two K chunks >= 16; got sizes {bad} for K={K}")
    bn = _block_n(N, flavour, block_n)
    Mp, Np = round_up(max(M, 1), block_m), round_up(N, bn)
    xp = pad_axis(x, 0, Mp)
    wp = pad_axis(w, 1, Np)
    kernel = functools.partial(_kernel, chunks=chunks, upcast=upcast)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // block_m, Np // bn),
        in_specs=[
            pl.BlockSpec((block_m, K), lambda i, j: (i, 0)),
            pl.BlockSpec((K, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, bn), lambda i, j: (i, j)),
        compiler_params=common.compiler_params(flavour, ("parallel", "parallel")),
        interpret=interpret,
        name="tml_bi_matmul",
    )(xp, wp)
    return out[:M, :N]
