"""Matmul / linear with a ``batch_invariant`` and a ``standard`` mode.

Shapes::

    matmul(x [..., K], w [K, N])      -> [..., N]     (leading dims are "rows")
    matmul(x [B, M, K], w [B, K, N])  -> [B, M, N]    (batched, e.g. per expert)
    linear(x [..., K], w [K, N], b [N] | None) -> [..., N]

float32 and bfloat16 (or mixed) inputs; accumulation is always float32; the result
has dtype ``result_type(x, w)``.

``batch_invariant`` algorithm (the one the Pallas kernel implements too):

1. rows are padded to a multiple of ``ROW_TILE`` (64) so every GEMM runs on whole
   row tiles and never hits a "few rows" strategy (this is what a decode step pays
   for on CPU: a 1-session step computes a 64-row tile);
2. bf16 operands are upcast to float32 (exact) — products are exact in float32;
3. the contraction is cut into canonical chunks of ``K_CHUNK`` (512; the last one
   shorter), each chunk product is one float32 GEMM, and the chunk products are
   added left to right. No split-K.

Hence the bits of an output row depend only on that input row, ``w``, and the
static (ROW_TILE, K_CHUNK) — never on how many other rows share the call.

The backward pass (``custom_vjp``) uses the same algorithm for ``dx = dy @ w.T``
(so input gradients are batch-invariant too) and for ``dw = x.T @ dy`` (rows of
``dw`` are the K dimension; the sum over the batch rows is chunked canonically, so
it is deterministic run to run).

``standard`` is ``jnp.dot(..., preferred_element_type=float32)`` with autodiff.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from .mode import resolve_impl, resolve_mode
from .pallas.matmul_kernel import matmul as pallas_matmul
from .tiling import (
    K_CHUNK,
    ROW_TILE,
    chunk_bounds,
    pad_axis,
    round_up,
    sequence_tree,
    upcast,
)

_HIGHEST = lax.Precision.HIGHEST

# XLA:CPU computes a one-row GEMV and a >= 51-row GEMM with the same per-output
# sequential FMA chain over a K chunk of <= 512 when N is a multiple of 64 and the
# weight is not (physically) transposed — measured on this project's machines (N = 96,
# 130, 160, 400 ... and ``dy @ w.T`` gave other bits). matmul does NOT rely on it (a
# weight may arrive transposed, e.g. tied embeddings, depending on the program); only
# the MoE gather+GEMV decode path does, guarded by :func:`gemv_matches_gemm` and tested.
GEMV_COLS_MULTIPLE = 64


def gemv_matches_gemm(n_cols: int, k_chunk: int) -> bool:
    """Whether a one-row GEMV (untransposed weight) gives the bits of a row of the tiled
    GEMM on XLA:CPU (see above)."""
    return n_cols % GEMV_COLS_MULTIPLE == 0 and k_chunk <= 512


def chunked_dot(x: jax.Array, w: jax.Array, k_chunk: int = K_CHUNK, *, batched: bool = False,
                w_transposed: bool = False) -> jax.Array:
    """``x @ w`` with the contraction in canonical chunks, float32 result; no row padding.

    x [M, K] @ w [K, N] -> [M, N], or with ``batched=True`` x [B, M, K] @ w [B, K, N]
    -> [B, M, N]. ``w_transposed``: w is given as [N, K] (2-D only) and the product is
    ``x @ w.T``, each chunk GEMM contracting w's last axis in place — the input gradient
    ``dy @ w.T`` without first copying the transposed weight (a [5120, 4800] hMLP weight's
    transpose copy took 7% of a ``small`` train step on CPU); the same chunks, the same
    bits (``tests/kernels/test_matmul_long_k.py``). The contraction is cut into chunks of ``k_chunk`` (the last one
    shorter), each chunk product is one float32 GEMM at HIGHEST precision, and the chunk
    products are added left to right. bf16 operands are upcast (exact).

    This is the inner step of :func:`matmul` (which first pads rows to whole
    ``ROW_TILE`` tiles so that every GEMM takes the same accumulation path); call it
    directly only where the row count is already canonical, or for the MoE one-row GEMV
    path, whose bits match the tiled GEMM only under :func:`gemv_matches_gemm`.

    In the 2-D case the whole chunks run as one GEMM batched over the chunk index (``w``
    reshaped to [C, k_chunk, N], no copy of the weights) — the same per-chunk GEMMs,
    fewer weight copies than slicing.

    More than :data:`UNROLLED_CHUNKS` whole chunks (a long contraction: the weight
    gradient ``x.T @ dy`` sums over every row of the batch, 8,192 chunks for 4M rows) run
    as a ``fori_loop`` over the chunks (:func:`_looped_chunks`), the same per-chunk GEMMs
    added in the same order, bitwise equal (``tests/kernels/test_matmul_long_k.py``); unrolled,
    the trace and the HLO grow with the row count. So do 2-D products whose chunk-batched
    GEMM would hold more than :data:`CHUNK_PRODUCTS_BYTES` of chunk products at once (a
    vocabulary head: 8 chunks of [4096, 201024] float32 are 24.5 GiB a TPU chip; the loop
    keeps one accumulator).
    """
    x, w = upcast(x), upcast(w)
    if w_transposed and batched:
        raise ValueError("chunked_dot: w_transposed is for the 2-D product")
    K = x.shape[-1]
    N = w.shape[0] if w_transposed else w.shape[-1]
    n_full = K // k_chunk
    products = n_full * x.shape[-2] * N * 4  # the chunk-batched GEMM's float32 output
    if n_full > UNROLLED_CHUNKS or (not batched and n_full >= 2 and products > CHUNK_PRODUCTS_BYTES):
        return _looped_chunks(x, w, k_chunk, batched=batched, w_transposed=w_transposed)
    parts = []
    if not batched and not w_transposed and K >= 2 * k_chunk:
        # (a transposed w keeps one 2-D GEMM per chunk: batched, XLA:CPU copies w to [C, kc, N])
        n_full = K // k_chunk
        kf = n_full * k_chunk
        xb = x[:, :kf].reshape(x.shape[0], n_full, k_chunk).transpose(1, 0, 2)  # [C, Mp, kc]
        wb = w[:kf].reshape(n_full, k_chunk, N)  # [C, kc, N]
        pb = lax.dot_general(
            xb, wb, (((2,), (1,)), ((0,), (0,))), precision=_HIGHEST, preferred_element_type=jnp.float32
        )
        parts = [pb[i] for i in range(n_full)]
        rest = [(kf, K)] if kf < K else []
    else:
        rest = chunk_bounds(K, k_chunk)
    for k0, k1 in rest:
        parts.append(_chunk_product(x[..., k0:k1], _k_slice(w, k0, k1, w_transposed), batched, w_transposed))
    acc = parts[0]
    for part in parts[1:]:  # left to right (a list of differently shaped slices' products)
        acc = acc + part
    return acc


# Whole K chunks up to which chunked_dot writes one GEMM per chunk into the program; above
# it, one GEMM in a loop body (trace and HLO size then independent of the contraction).
UNROLLED_CHUNKS = 16
# Bytes of float32 chunk products the 2-D chunk-batched GEMM may hold at once; above, the loop.
CHUNK_PRODUCTS_BYTES = 1 << 30


def _k_slice(w, k0, k1, w_transposed):
    """Contraction slice [k0, k1) of w ([..., K, N], or [N, K] when ``w_transposed``)."""
    return w[:, k0:k1] if w_transposed else w[..., k0:k1, :]


def _chunk_product(xs, ws, batched, w_transposed):
    """One chunk GEMM: xs [(B,) M, kc] with ws [(B,) kc, N] (or [N, kc]) -> [(B,) M, N] f32."""
    if batched:
        dims = (((2,), (1,)), ((0,), (0,)))
    else:
        dims = (((1,), (1 if w_transposed else 0,)), ((), ()))
    return lax.dot_general(xs, ws, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _looped_chunks(x: jax.Array, w: jax.Array, k_chunk: int, *, batched: bool,
                   w_transposed: bool = False) -> jax.Array:
    """:func:`chunked_dot` (float32 operands) as a loop: x [M, K] @ w [K, N] -> [M, N]
    (w [N, K] with ``w_transposed``) or x [B, M, K] @ w [B, K, N] -> [B, M, N].

    ``acc = P_0``, then ``acc = acc + P_c`` for the whole chunks ``c = 1 .. C-1`` in a
    ``fori_loop`` (``P_c`` = the GEMM of contraction slice ``[c·k_chunk, (c+1)·k_chunk)``,
    dynamic slices of the operands), then ``acc + P_rest`` for a shorter last chunk:
    the unrolled chain's GEMMs and adds in its order.
    """
    K = x.shape[-1]
    n_full = K // k_chunk

    def product(xs, ws):
        return _chunk_product(xs, ws, batched, w_transposed)

    def chunk(c):
        xs = lax.dynamic_slice_in_dim(x, c * k_chunk, k_chunk, axis=x.ndim - 1)
        ws = lax.dynamic_slice_in_dim(w, c * k_chunk, k_chunk, axis=1 if w_transposed else w.ndim - 2)
        return product(xs, ws)

    acc = lax.fori_loop(1, n_full, lambda c, a: a + chunk(c), product(x[..., :k_chunk], _k_slice(w, 0, k_chunk, w_transposed)))
    kf = n_full * k_chunk
    if kf < K:
        acc = acc + product(x[..., kf:], _k_slice(w, kf, K, w_transposed))
    return acc


def _reference_2d(x: jax.Array, w: jax.Array, row_tile: int, k_chunk: int) -> jax.Array:
    """x [M, K] @ w [K, N] -> float32 [M, N], rows padded to whole tiles."""
    M = x.shape[0]
    xp = pad_axis(x, 0, round_up(max(M, 1), row_tile))
    return chunked_dot(xp, w, k_chunk)[:M]


def _reference_batched(x: jax.Array, w: jax.Array, row_tile: int, k_chunk: int) -> jax.Array:
    """x [B, M, K] @ w [B, K, N] -> float32 [B, M, N]."""
    M = x.shape[1]
    xp = pad_axis(x, 1, round_up(max(M, 1), row_tile))
    return chunked_dot(xp, w, k_chunk, batched=True)[:, :M]


def _forward_2d(x, w, row_tile, k_chunk, impl):
    if impl == "pallas":
        return pallas_matmul(x, w, block_m=row_tile, k_chunk=k_chunk, out_dtype=jnp.float32)
    return _reference_2d(x, w, row_tile, k_chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bi_matmul_2d(x, w, row_tile, k_chunk, impl):
    return _forward_2d(x, w, row_tile, k_chunk, impl)


def _bi_matmul_2d_fwd(x, w, row_tile, k_chunk, impl):
    return _forward_2d(x, w, row_tile, k_chunk, impl), (x, w)


def _bi_matmul_2d_bwd(row_tile, k_chunk, impl, res, dy):
    x, w = res
    if impl == "pallas":
        dx = _forward_2d(dy, w.T, row_tile, k_chunk, impl).astype(x.dtype)
    else:  # the reference chain on w [K, N] as given: dy [M, N] contracts its N axis in place
        dyp = pad_axis(dy, 0, round_up(max(dy.shape[0], 1), row_tile))
        dx = chunked_dot(dyp, w, k_chunk, w_transposed=True)[: dy.shape[0]].astype(x.dtype)
    dw = weight_grad(x, dy, row_tile=row_tile, k_chunk=k_chunk, impl=impl).astype(w.dtype)
    return dx, dw


_bi_matmul_2d.defvjp(_bi_matmul_2d_fwd, _bi_matmul_2d_bwd)


# ------------------------------------------------------- weight gradients over a split batch
class WeightGradAxes(NamedTuple):
    """A binding of :func:`sharded_weight_grads`: the mesh and its batch-splitting axes."""

    mesh: Any
    axes: tuple[str, ...]


_wgrad = jax.make_user_context(None)  # WeightGradAxes | None, in every jit cache key


@contextlib.contextmanager
def sharded_weight_grads(mesh, axes: Sequence[str]) -> Iterator[None]:
    """Compute every batch-invariant weight gradient ``x.T @ dy`` traced inside the block
    shard by shard over the mesh axes ``axes`` that split the rows (the batch; read at
    trace time, part of the jit cache key; axes of size 1 are dropped).

    Unbound, the weight gradient contracts all M rows in one chain of canonical K chunks
    (:func:`chunked_dot`, a ``fori_loop`` over the rows above 16 chunks). Under GSPMD
    with the rows split over devices, that chain (a loop of dynamic slices along the
    split dimension) makes the compiler gather ``x`` and ``dy`` whole onto every device:
    for a vocabulary head, the float32 logits gradient of the whole micro-batch per chip.
    Bound, :func:`weight_grad` runs a ``shard_map`` manual over ``axes``: each rank
    contracts its own rows (the same chain over its M/n rows), then an ordered
    reduce-scatter — ``all_to_all`` of the [n, K/n, N] pieces, rank r receiving piece r of
    every rank, summed in rank order in the adjacent-pairs
    :func:`~tml.kernels.tiling.sequence_tree` — leaves [K, N] split over ``axes`` along K
    (K padded to a multiple of n). Deterministic (a fixed program, fixed order), but a
    different association of the same products than one device's chain, so the bits
    depend on the number of row shards (tolerance, not bitwise, against one device; the
    GSPMD meshes that use this are not bitwise to one device anyway,
    :mod:`tml.parallel.sharding`). Per device: two [K, N] float32 buffers instead of the
    whole [M, N] ``dy``.
    """
    sizes = dict(mesh.shape)
    for a in axes:
        if a not in sizes:
            raise ValueError(f"weight-gradient axis {a!r} is not an axis of the mesh {sizes}")
    kept = tuple(a for a in axes if sizes[a] > 1)
    with _wgrad(WeightGradAxes(mesh, kept) if kept else None):
        yield


def bound_weight_grad_axes() -> WeightGradAxes | None:
    """The :func:`sharded_weight_grads` binding in effect, or None."""
    return _wgrad.value


def _manual_axes() -> frozenset:
    try:
        return frozenset(jax.sharding.get_abstract_mesh().manual_axes)
    except Exception:  # noqa: BLE001 — no abstract mesh in context
        return frozenset()


def weight_grad(x: jax.Array, dy: jax.Array, *, row_tile: int = ROW_TILE, k_chunk: int = K_CHUNK,
                impl: str | None = None) -> jax.Array:
    """``x.T @ dy``: x [M, K], dy [M, N] -> float32 [K, N], the batch-invariant weight
    gradient; shard by shard over the rows inside :func:`sharded_weight_grads` (when the
    row shards divide M and none of their axes is already manual), else one chain."""
    impl = resolve_impl(impl)
    b = bound_weight_grad_axes()
    if b is not None:
        n = math.prod(dict(b.mesh.shape)[a] for a in b.axes)
        if x.shape[0] % n == 0 and not (_manual_axes() & set(b.axes)):
            return _sharded_weight_grad(x, dy, b, n, row_tile, k_chunk, impl)
    return _forward_2d(x.T, dy, row_tile, k_chunk, impl)


def _local_weight_grad(x, dy, row_tile, k_chunk, impl):
    """One rank's ``x.T @ dy`` (x [m, K], dy [m, N] -> float32 [K, N]): the reference chain
    always as the :func:`_looped_chunks` loop (bitwise the unrolled chain), whose live set
    is one [K, N] accumulator — the unrolled path's chunk-batched GEMM holds all m/512
    chunk products at once (8 x 3.3 GB for a 201,024-entry head at 4,096 rows a rank)."""
    if impl != "reference" or x.shape[0] < 2 * k_chunk:
        return _forward_2d(x.T, dy, row_tile, k_chunk, impl)
    xt = pad_axis(upcast(x.T), 0, round_up(x.shape[1], row_tile))
    return _looped_chunks(xt, upcast(dy), k_chunk, batched=False)[: x.shape[1]]


def _sharded_weight_grad(x, dy, b: WeightGradAxes, n: int, row_tile, k_chunk, impl):
    K, N = x.shape[1], dy.shape[1]
    Kp = round_up(K, n)
    axes = b.axes if len(b.axes) > 1 else b.axes[0]

    def local(xl, dyl):  # this rank's rows [M/n, K], [M/n, N]
        part = pad_axis(_local_weight_grad(xl, dyl, row_tile, k_chunk, impl), 0, Kp)  # [Kp, N]
        pieces = lax.all_to_all(part.reshape(n, Kp // n, N), axes, 0, 0)  # [n (source rank), Kp/n, N]
        return sequence_tree([pieces[i] for i in range(n)])

    rows = PartitionSpec(axes, None)
    out = jax.shard_map(local, mesh=b.mesh, in_specs=(rows, rows), out_specs=rows,
                        axis_names=frozenset(b.axes), check_vma=False)(x, dy)
    return out[:K]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bi_matmul_batched(x, w, row_tile, k_chunk):
    return _reference_batched(x, w, row_tile, k_chunk)


def _bi_matmul_batched_fwd(x, w, row_tile, k_chunk):
    return _reference_batched(x, w, row_tile, k_chunk), (x, w)


def _bi_matmul_batched_bwd(row_tile, k_chunk, res, dy):
    x, w = res
    dx = _reference_batched(dy, jnp.swapaxes(w, 1, 2), row_tile, k_chunk).astype(x.dtype)
    dw = _reference_batched(jnp.swapaxes(x, 1, 2), dy, row_tile, k_chunk).astype(w.dtype)
    return dx, dw


_bi_matmul_batched.defvjp(_bi_matmul_batched_fwd, _bi_matmul_batched_bwd)


def _matmul_f32(x, w, mode, impl, row_tile, k_chunk):
    """float32 result of x @ w (shapes as :func:`matmul`)."""
    if w.ndim == 3:
        if x.ndim != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[1]:
            raise ValueError(f"batched matmul wants x [B,M,K], w [B,K,N]; got {x.shape}, {w.shape}")
        if mode == "standard":
            return jnp.einsum("bmk,bkn->bmn", x, w, preferred_element_type=jnp.float32)
        return _bi_matmul_batched(x, w, row_tile, k_chunk)
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul wants x [..., K], w [K, N]; got {x.shape}, {w.shape}")
    if mode == "standard":
        return jnp.dot(x, w, preferred_element_type=jnp.float32)
    lead = x.shape[:-1]
    x2 = x.reshape((-1, x.shape[-1]))
    y = _bi_matmul_2d(x2, w, row_tile, k_chunk, resolve_impl(impl))
    return y.reshape(lead + (w.shape[1],))


def matmul(
    x: jax.Array,
    w: jax.Array,
    *,
    mode: str | None = None,
    impl: str | None = None,
    row_tile: int = ROW_TILE,
    k_chunk: int = K_CHUNK,
    out_dtype=None,
) -> jax.Array:
    """``x @ w`` with float32 accumulation; see the module docstring for shapes.

    mode: ``"batch_invariant"`` / ``"standard"`` / None (current mode).
    impl: batch_invariant implementation, ``"auto"`` / ``"reference"`` / ``"pallas"``.
    out_dtype: result dtype (default ``result_type(x, w)``).
    """
    out_dtype = jnp.result_type(x.dtype, w.dtype) if out_dtype is None else out_dtype
    return _matmul_f32(x, w, resolve_mode(mode), impl, row_tile, k_chunk).astype(out_dtype)


def linear(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    mode: str | None = None,
    impl: str | None = None,
) -> jax.Array:
    """``x [..., K] @ w [K, N] (+ b [N])`` -> [..., N]; the bias is added in float32
    before the single rounding to ``result_type(x, w)``."""
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    y = _matmul_f32(x, w, resolve_mode(mode), impl, ROW_TILE, K_CHUNK)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(out_dtype)
