"""Deterministic, TP-degree-invariant reductions for use inside ``jax.shard_map``.

``psum`` reduces in whatever order the backend's all-reduce picks (ring, tree, by
message size, by device count) so a row-parallel linear gives different bits at
TP = 1, 2, 4, 8. Here the contraction is cut into ``C`` **canonical chunks** (C = the
largest supported TP degree, default 8); every rank computes the partial products of
its ``C / tp`` chunks, and the C partials are summed in one **fixed pairwise tree**
(:func:`tml.kernels.tiling.pairwise_tree`), whatever the TP degree:

* **one-shot** (``"one_shot"``, NVLS-style): all-gather the partials (every rank
  receives all C), each rank sums them locally in the tree;
* **two-shot** (``"two_shot"``): an ``all_to_all`` reduce-scatter — rank r receives
  all C partials of the r-th slice of the output and sums them in the same tree —
  then an all-gather of the reduced slices. Same additions, same order, so the same
  bits as one-shot, with 1/tp of the local reduction work.

Shapes (inside ``shard_map`` over mesh axis ``axis_name`` of size tp)::

    all_reduce_chunks(partials [c_local, ...], axis_name) -> [...]   (c_local = C / tp)
    row_parallel_linear(x [..., K/tp], w [K/tp, N], axis_name=)  -> [..., N] (replicated)
    chunked_linear(x [..., K], w [K, N])   the same result on one device (no collectives)

**From a model** (outside ``shard_map``): ``row_parallel_linear(x [..., K], w [K, N],
axis="mlp")`` names the *logical* axis of the contraction. Unbound, it is
:func:`chunked_linear` (the C canonical chunks in the same tree, on one device). Inside
:func:`row_parallel_axes` (entered by :func:`tml.parallel.tensor_parallel`, which reads
the mesh axis from the sharding rules) a logical name mapped to a mesh axis of size > 1
runs the ``shard_map`` itself (manual over that axis only, the other mesh axes left to
the compiler): ``x`` split along K, ``w`` along its rows, the partials reduced by the
bound algorithm. The model never names a mesh axis, and the same chunk order holds at
every TP degree including 1, so a sampler on TP = 2 or 4 gives the bits of the trainer
on one device (``tests/sampler/test_tp_alignment.py``). The binding is a
``jax.make_user_context`` value like the kernel mode: part of every jit cache key.

The chunk products use the batch-invariant matmul (:mod:`tml.kernels.tiled_matmul`), so the
result is also invariant to the number of rows. ``mode="standard"`` is the plain
``psum(x @ w)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from .mode import resolve_mode
from .tiled_matmul import matmul, weight_grad
from .tiling import pad_axis, pairwise_tree, round_up, sequence_tree

MAX_TP = 8
ALGORITHMS = ("one_shot", "two_shot")


def tree_sum(partials: jax.Array, axis: int = 0) -> jax.Array:
    """Sum ``partials`` over ``axis`` in the fixed pairwise tree. [C, ...] -> [...]."""
    parts = [lax.index_in_dim(partials, i, axis, keepdims=False) for i in range(partials.shape[axis])]
    return pairwise_tree(parts)


def one_shot_all_reduce(partials: jax.Array, axis_name: str) -> jax.Array:
    """[c_local, ...] per rank -> [...] on every rank: all-gather, then local tree sum."""
    gathered = lax.all_gather(partials, axis_name, axis=0, tiled=True)  # [C, ...] in chunk order
    return tree_sum(gathered, 0)


def two_shot_all_reduce(partials: jax.Array, axis_name: str) -> jax.Array:
    """[c_local, ...] per rank -> [...] on every rank: reduce-scatter (fixed tree), all-gather."""
    tp = lax.axis_size(axis_name)
    c_local = partials.shape[0]
    out_shape = partials.shape[1:]
    flat = partials.reshape(c_local, -1)
    n = flat.shape[1]
    flat = pad_axis(flat, 1, round_up(max(n, 1), tp))
    pieces = flat.reshape(c_local, tp, -1)
    # rank r receives the r-th slice of every rank's chunks, in rank (= chunk) order
    mine = lax.all_to_all(pieces, axis_name, split_axis=1, concat_axis=0, tiled=True)  # [C, 1, n/tp]
    reduced = tree_sum(mine, 0)  # [1, n/tp]
    full = lax.all_gather(reduced, axis_name, axis=0, tiled=True)  # [tp, n/tp]
    return full.reshape(-1)[:n].reshape(out_shape)


def all_reduce_chunks(partials: jax.Array, axis_name: str, algorithm: str = "one_shot") -> jax.Array:
    """Deterministic all-reduce of canonical chunk partials; see the module docstring."""
    if algorithm == "one_shot":
        return one_shot_all_reduce(partials, axis_name)
    if algorithm == "two_shot":
        return two_shot_all_reduce(partials, axis_name)
    raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")


def ordered_all_reduce(x: jax.Array, axis_name: str, *, mode: str | None = None) -> jax.Array:
    """Sum ``x`` [...] over the ranks of ``axis_name`` in rank order (inside ``shard_map``).

    batch_invariant: all-gather the ``tp`` partials (one-shot, NVLS-style) and sum them
    in the adjacent-pairs :func:`~tml.kernels.tiling.sequence_tree`, so the result has
    the same bits on every rank and composes with a per-rank tree over contiguous,
    power-of-two blocks into one global tree (data-parallel gradient sums that do not
    depend on the number of ranks). standard: ``psum`` (the backend's order).
    """
    if resolve_mode(mode) == "standard":
        return lax.psum(x, axis_name)
    gathered = lax.all_gather(x, axis_name, axis=0)  # [tp, ...] in rank order
    return sequence_tree([gathered[i] for i in range(gathered.shape[0])])


def _chunk_partials(x: jax.Array, w: jax.Array, n_chunks: int) -> jax.Array:
    """x [..., Kl] @ w [Kl, N] cut into n_chunks equal K chunks -> [n_chunks, ..., N] f32."""
    Kl = x.shape[-1]
    if Kl % n_chunks:
        raise ValueError(f"local contraction {Kl} is not divisible into {n_chunks} canonical chunks")
    c = Kl // n_chunks
    parts = [
        matmul(x[..., i * c : (i + 1) * c], w[i * c : (i + 1) * c], mode="batch_invariant", out_dtype=jnp.float32)
        for i in range(n_chunks)
    ]
    return jnp.stack(parts, axis=0)


class RowParallelAxes(NamedTuple):
    """A binding of :func:`row_parallel_axes`: ``axes`` = ((logical name, mesh axis), ...)
    for the contraction axes split over ``mesh``; ``algorithm`` one of :data:`ALGORITHMS`."""

    mesh: Any
    axes: tuple[tuple[str, str], ...]
    algorithm: str


_bound = jax.make_user_context(None)  # RowParallelAxes | None, in every jit cache key


@contextlib.contextmanager
def row_parallel_axes(mesh, axes: Mapping[str, str | None], *, algorithm: str = "one_shot") -> Iterator[None]:
    """Bind logical contraction axes to mesh axes for :func:`row_parallel_linear` (read
    at trace time; part of the jit cache key). axes: ``{"q_heads": "tensor", ...}``; a
    name mapped to ``None`` or to an axis of size 1 stays on one device."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    sizes = dict(mesh.shape)
    kept = []
    for name, ax in sorted(axes.items()):
        if ax is None:
            continue
        if ax not in sizes:
            raise ValueError(f"row-parallel axis {name!r} -> {ax!r} is not an axis of the mesh {sizes}")
        if sizes[ax] > 1:
            kept.append((name, ax))
    with _bound(RowParallelAxes(mesh, tuple(kept), algorithm) if kept else None):
        yield


def bound_row_parallel(axis: str) -> tuple[Any, str, str] | None:
    """(mesh, mesh axis, algorithm) that logical ``axis`` is bound to, or None."""
    b = _bound.value
    if b is None:
        return None
    for name, ax in b.axes:
        if name == axis:
            return b.mesh, ax, b.algorithm
    return None


def _shard_mapped(x, w, mesh, mesh_axis, num_chunks, algorithm, mode):
    """x [..., K] @ w [K, N] as a shard_map manual over ``mesh_axis`` only."""
    tp = dict(mesh.shape)[mesh_axis]
    if x.shape[-1] % tp:
        raise ValueError(f"contraction {x.shape[-1]} is not divisible by the {mesh_axis!r} axis of size {tp}: "
                         f"pick a tensor-parallel degree dividing it, or map its logical axis to null")
    body = functools.partial(row_parallel_linear, axis_name=mesh_axis, num_chunks=num_chunks,
                             algorithm=algorithm, mode=mode)
    spec_x = PartitionSpec(*([None] * (x.ndim - 1)), mesh_axis)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec_x, PartitionSpec(mesh_axis, None)),
                         out_specs=PartitionSpec(), axis_names=frozenset({mesh_axis}), check_vma=False)(x, w)


def row_parallel_linear(
    x: jax.Array,
    w: jax.Array,
    *,
    axis: str | None = None,
    axis_name: str | None = None,
    num_chunks: int = MAX_TP,
    algorithm: str | None = None,
    mode: str | None = None,
) -> jax.Array:
    """The canonical-chunk row-parallel linear ``x @ w`` (see the module docstring).

    ``axis_name`` (inside ``shard_map``): x [..., K/tp] (K-sharded), w [K/tp, N]; returns
    the full [..., N] on every rank, bitwise identical for every tp dividing
    ``num_chunks`` (batch_invariant) — or ``psum(x @ w)`` (standard).

    ``axis`` (a model's call, outside ``shard_map``): x [..., K], w [K, N], the logical
    name of K; sharded over the mesh axis :func:`row_parallel_axes` binds it to, else
    :func:`chunked_linear`. algorithm: ``None`` = the bound one (default one-shot).
    """
    if axis_name is None:
        bound = bound_row_parallel(axis) if axis is not None else None
        if bound is None:
            return chunked_linear(x, w, num_chunks=num_chunks, mode=mode)
        mesh, mesh_axis, bound_algorithm = bound
        return _shard_mapped(x, w, mesh, mesh_axis, num_chunks, algorithm or bound_algorithm, resolve_mode(mode))
    algorithm = algorithm or "one_shot"
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    if resolve_mode(mode) == "standard":
        return lax.psum(jnp.dot(x, w, preferred_element_type=jnp.float32), axis_name).astype(out_dtype)
    tp = lax.axis_size(axis_name)
    if num_chunks % tp:
        raise ValueError(f"tensor-parallel degree {tp} does not divide num_chunks={num_chunks}")
    partials = _chunk_partials(x, w, num_chunks // tp)
    return all_reduce_chunks(partials, axis_name, algorithm).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _chunked_2d(x: jax.Array, w: jax.Array, num_chunks: int) -> jax.Array:
    """x [M, K] @ w [K, N] -> float32 [M, N]: the canonical chunks in the fixed tree."""
    return tree_sum(_chunk_partials(x, w, num_chunks), 0)


def _chunked_2d_fwd(x, w, num_chunks):
    return _chunked_2d(x, w, num_chunks), (x, w)


def _chunked_2d_bwd(num_chunks, res, dy):
    # The gradients are whole batch-invariant matmuls (those of kernels.linear): autodiff
    # through the C chunk products ran 2C narrow GEMMs (x_c.T [K/C, M] padded to 64-row
    # tiles), measured 1.28x the tiny model's fwd+bwd; this is the plain linear's cost.
    x, w = res
    dx = matmul(dy, w.T, mode="batch_invariant", out_dtype=jnp.float32).astype(x.dtype)
    dw = weight_grad(x, dy).astype(w.dtype)
    return dx, dw


_chunked_2d.defvjp(_chunked_2d_fwd, _chunked_2d_bwd)


def chunked_linear(x: jax.Array, w: jax.Array, *, num_chunks: int = MAX_TP, mode: str | None = None) -> jax.Array:
    """Single-device twin of :func:`row_parallel_linear`: x [..., K] @ w [K, N], K cut into
    ``num_chunks`` canonical chunks summed in the fixed tree (== the TP result). Its
    gradients are the whole matmuls ``dy @ w.T`` and ``x.T @ dy`` (batch-invariant)."""
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    if resolve_mode(mode) == "standard":
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(out_dtype)
    if x.shape[-1] % num_chunks:
        raise ValueError(f"contraction {x.shape[-1]} is not divisible into {num_chunks} canonical chunks")
    y = _chunked_2d(x.reshape(-1, x.shape[-1]), w, num_chunks)
    return y.reshape(*x.shape[:-1], w.shape[1]).astype(out_dtype)
