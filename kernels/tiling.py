"""Canonical tile sizes and the fixed-order reduction shared by every kernel.

Why these numbers (measured on XLA:CPU, JAX 0.10, see ``tests/kernels``):

* ``ROW_TILE = 64``. XLA:CPU's GEMM picks a different per-row accumulation order
  for "few row" problems (observed for 2..50 rows when K*N >= 64K, for 1 row when
  N < 64, ...). Every GEMM with at least ~51 rows used one order for every row
  count. Padding rows up to a multiple of 64 therefore gives every row the same
  bits whatever the batch. The Pallas kernels use ``block_m = 64`` row tiles.
* ``K_CHUNK = 512``. The contraction is cut into canonical chunks of at most 512,
  each chunk's product computed by one GEMM with float32 accumulation, and the
  chunk products summed left to right. (No split-K: chunks are never computed in
  parallel and reduced in a data-dependent order.) XLA:CPU's GEMM accumulates a
  chunk of <= 512 as one sequential FMA chain per output, which the one-row
  (GEMV) path also does; that is what lets the MoE gather+GEMV decode path match
  the batched path bit for bit.
* ``SPLIT_SIZE = 64`` keys per attention split (a fixed size, never a fixed count).
* ``LANES = 16``. XLA:CPU evaluates a transcendental (``exp``, ``log1p``) in the
  vector loop body or in a remainder loop, and the two can round differently
  (a standalone ``exp`` over 3, 5, 6, 7, 11, ... elements differed from the same
  values inside a longer array). Arrays that go through ``exp``/``log`` in the
  batch-invariant ops therefore have a minor dimension that is a multiple of 16
  (padding the per-row vectors), see :func:`lane_padded`.

The reduction order for row sums (RMSNorm, softmax denominators) is a **pairwise
halving tree**: pad the axis with zeros to the next power of two P, then repeatedly
``y[i] = x[i] + x[i + P/2]``. It is written with elementwise adds only, so XLA
cannot re-associate it (``jnp.sum`` on XLA:CPU was *not* batch-invariant: the same
row summed inside 7 or 512 rows gave different bits).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

ROW_TILE = 64
K_CHUNK = 512
SPLIT_SIZE = 64
LANES = 16


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int, value: float = 0) -> jax.Array:
    """Pad ``x`` along ``axis`` at the end up to ``size`` (no-op if already that size)."""
    axis = axis % x.ndim
    extra = size - x.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad axis {axis} of size {x.shape[axis]} down to {size}")
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def chunk_bounds(total: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` cutting ``range(total)`` into pieces of ``chunk`` (last shorter)."""
    if total <= 0:
        return [(0, 0)]
    return [(s, min(s + chunk, total)) for s in range(0, total, chunk)]


def pairwise_sum(
    x: jax.Array, axis: int = -1, *, keepdims: bool = False, spelling: str = "slices", barrier: bool = False
) -> jax.Array:
    """Sum over ``axis`` in the canonical pairwise-halving order.

    x: [..., n, ...] -> [..., ...] (or [..., 1, ...] with ``keepdims``).

    ``spelling`` only changes how the same tree is written:
    ``"slices"`` (``x[:h] + x[h:]``; XLA and Mosaic-TPU) or ``"reshape"``
    (``x.reshape(2, h).sum(0)``; Triton cannot slice register values). The
    reshape spelling must not be used under XLA without ``barrier=True``: the
    simplifier folds chains of reshape+reduce into one reduce of its own order;
    ``barrier`` puts an ``optimization_barrier`` after every level (used when a
    Triton-flavour kernel body is run in interpret mode on CPU).
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    p = next_pow2(n)
    if p != n:
        x = pad_axis(x, axis, p)
    while x.shape[axis] > 1:
        h = x.shape[axis] // 2
        if spelling == "slices":
            lo = lax.slice_in_dim(x, 0, h, axis=axis)
            hi = lax.slice_in_dim(x, h, 2 * h, axis=axis)
            x = lo + hi
        elif spelling == "reshape":
            shape = x.shape[:axis] + (2, h) + x.shape[axis + 1 :]
            x = jnp.sum(x.reshape(shape), axis=axis)
            if barrier:
                x = lax.optimization_barrier(x)
        else:
            raise ValueError(f"unknown spelling {spelling!r}")
    return x if keepdims else jnp.squeeze(x, axis)


def pairwise_tree(parts: Sequence[jax.Array]) -> jax.Array:
    """Sum a list of equally shaped arrays in the fixed pairwise tree.

    The same halving tree as :func:`pairwise_sum`: for 8 parts
    ``((p0+p4) + (p2+p6)) + ((p1+p5) + (p3+p7))``. A non power-of-two count is padded
    (conceptually) with zeros at the end, i.e. unpaired parts are carried up unchanged.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("pairwise_tree of nothing")
    p = next_pow2(len(parts))
    while len(parts) > 1:
        h = p // 2
        nxt = []
        for i in range(h):
            j = i + h
            if i < len(parts) and j < len(parts):
                nxt.append(parts[i] + parts[j])
            elif i < len(parts):
                nxt.append(parts[i])
        parts, p = nxt, h
    return parts[0]


def sequence_tree(parts: Sequence[jax.Array]) -> jax.Array:
    """Sum a list of equally shaped arrays in the fixed **adjacent-pairs** tree.

    Level by level, ``y[i] = x[2i] + x[2i+1]``, an unpaired last part carried up: for 6
    parts ``((p0+p1) + (p2+p3)) + (p4+p5)``. Contiguous runs of a power-of-two length,
    aligned to their length, are complete subtrees, so a sum over contiguous blocks of
    ``2^a`` parts (e.g. the micro-batches of one data-parallel rank) followed by this
    tree over the block sums gives the same bits as this tree over all parts
    (:func:`tml.kernels.ordered_all_reduce`, :mod:`tml.train.step`).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("sequence_tree of nothing")
    while len(parts) > 1:
        nxt = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return parts[0]


def ordered_sum(x: jax.Array, axis: int) -> jax.Array:
    """Sum over ``axis`` strictly left to right: ``((x0 + x1) + x2) + ...``.

    x: [..., n, ...] -> [..., ...]. For a few slots whose order is part of the contract:
    a token's k MoE expert outputs (slot order ``j = 0..k-1``), the k slot gradients of a
    dispatched token, attention's ``dq`` over KV splits. Written as a chain of elementwise
    adds, so the order is fixed by the program and never left to the compiler (an XLA
    reduce, ``jnp.sum``, picks its own order, which on XLA:CPU depended on the number of
    rows sharing the call, see the module docstring).
    """
    axis = axis % x.ndim
    out = lax.index_in_dim(x, 0, axis, keepdims=False)
    for j in range(1, x.shape[axis]):
        out = out + lax.index_in_dim(x, j, axis, keepdims=False)
    return out


def rounded(x: jax.Array) -> jax.Array:
    """``x``, rounded to its dtype before any consumer sees it: products summed after
    this are never contracted into FMAs.

    XLA:CPU lets LLVM contract a multiply feeding an add into one FMA (one rounding
    instead of two) whenever both land in the same fused loop, which depends on the
    whole program: the same row sum of products then rounds differently on one device
    and on a data-parallel rank. (``optimization_barrier`` does not help: XLA:CPU removes
    it before fusion.) A select on ``x == x`` (NaN stays NaN) sits between the multiply
    and the add, and nothing contracts through it.
    """
    return jnp.where(x == x, x, jnp.nan)  # noqa: PLR0124 (the point: a NaN test between mul and add)


def lane_padded(fn, x: jax.Array, axis: int = -1, fill: float = 1.0) -> jax.Array:
    """Apply elementwise ``fn`` with ``axis`` padded to a multiple of ``LANES``.

    ``fn`` sees ``x`` padded (with ``fill``) so its loop never runs a remainder
    iteration; the padding is sliced off again. x: [..., n, ...] -> same shape.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    y = fn(pad_axis(x, axis, round_up(max(n, 1), LANES), fill))
    return lax.slice_in_dim(y, 0, n, axis=axis)


def upcast(x: jax.Array) -> jax.Array:
    """Floating inputs narrower than float32 (bf16, f16) -> float32 (exact)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x
