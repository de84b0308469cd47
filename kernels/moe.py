"""Mixture-of-experts expert compute (routing given router logits, dispatch, SwiGLU
experts, combine), batch-invariant and deterministic.

Shapes::

    route_topk(router_logits [T, E], k)  -> weights [T, k] float32, experts [T, k] int32
    moe_ffn(x [T, D], experts [T, k], weights [T, k],
            w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D], axis=None) -> [T, D]

Expert e computes ``(act(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`` (SwiGLU with
``act = silu`` by default). A token's output is ``sum_j weights[t, j] * expert_j(x_t)``.

``batch_invariant`` algorithm:

* **routing**: scores ``sigmoid(logits)`` (or the batch-invariant softmax), top-k
  on ``scores + correction_bias`` (``lax.top_k``: ties go to the lower expert id),
  weights = the selected scores, optionally divided by their pairwise-tree sum;
* **dispatch** (``path="grouped"``): the T*k (token, slot) assignments are stably
  sorted by expert; every expert's group is padded to whole row tiles of
  ``ROW_TILE`` (64) rows; a ``lax.scan`` over tiles runs the fixed-tile matmul
  (:mod:`tml.kernels.tiled_matmul` algorithm: f32, canonical K chunks) with that tile's
  expert weights; tiles past the last used one are skipped. On one device the scan's
  backward is written out (:func:`_tile_scan`: the same products added in the same
  order as autodiff of the scan, without its per-tile [E, D, F] cotangents);
* the routing weight multiplies the hidden activation **before** the down
  projection (``down(h * w)``, linear, so the same function): no ``w * y + ...``
  multiply-add is left for the compiler to contract differently in different programs;
* the **down projection** is row-parallel: F is cut into ``num_chunks`` (8) canonical
  chunks whose products are summed in the fixed pairwise tree, the algorithm of
  :func:`tml.kernels.row_parallel_linear` (gradients: the whole matmuls), on one device
  as one GEMM batched over the chunks (:func:`_tile_down`, the same bits). With
  ``axis="expert_mlp"`` (the logical name of F) bound to a mesh axis by
  :func:`tml.kernels.collectives.row_parallel_axes` (:func:`tml.parallel.tensor_parallel`),
  the expert compute runs in a ``shard_map`` over that axis: every rank computes its
  F / tp columns of gate and up, and the partials of its 8 / tp chunks; after the tiles
  they are reduced one-shot / two-shot (``psum`` in ``standard``). Same bits at
  TP = 1, 2, 4, 8 (``tests/kernels/test_moe.py``, 8 fake devices; column slices need
  >= 64 columns per rank on XLA:CPU);
* **combine**: a token's k expert outputs are added in slot order ``j = 0..k-1``.

So a token's output depends only on its own row, its routing and the weights —
never on which or how many other tokens were routed with it. bfloat16 inputs are
upcast exactly; every step up to the final rounding to ``x.dtype`` is float32 at the
same fixed points in both paths, so bf16 is batch-invariant as well (tested against the
algorithm spelled out with ``matmul`` / ``chunked_linear``, and through the sampler).

``path="gemv"`` is the small-decode-batch path: per assignment, gather the expert's
weights and run a one-row GEMV (``[A,1,D] @ [A,D,F]``, canonical K chunks, no row
padding). On XLA:CPU a one-row GEMV and a >= 51-row GEMM both accumulate each
output as one sequential FMA chain per K chunk (chunks <= 512, output columns a
multiple of 64), so the two paths give the same bits — this is measured, not assumed:
``tests/kernels/test_moe.py`` checks it. An explicit ``path="gemv"`` with other widths
is refused rather than silently giving other bits. The GEMV path's weight gradients go
through a gather (scatter-add in the backward); it is meant for decoding.

``path="auto"`` is chosen **per backend, where the bits were established**
(:data:`AUTO_PATHS`):

* ``cpu``: the GEMV path for at most ``GEMV_MAX_ASSIGNMENTS`` assignments when the
  widths allow it, else grouped — the GEMV = GEMM equality above is a measured property
  of XLA:CPU's kernels;
* ``cuda`` / ``rocm`` / ``tpu``: always grouped. Whether a cuBLAS / Mosaic GEMV
  accumulates like the tiled GEMM of the same rows was never measured (and on GPU the
  two are different library kernels with their own split strategies), so the one path
  whose bits do not depend on the number of tokens by construction is the only one used.

The choice is made with ``lax.platform_dependent``, i.e. at *lowering* time for the
platform being compiled for, not from the tracing process's default backend: a program
exported on a CPU host for ``platforms=["cuda"]`` or ``["tpu"]`` carries the grouped path
(``tests/kernels/test_moe.py``). Lowered for one platform, the unused branch is dropped
and XLA folds the constant branch index, so the CPU program is the GEMV one as before.

Gradients: the dispatch gather has a ``custom_vjp`` whose backward gathers each
token's k slot gradients and adds them in slot order (no scatter-add with
colliding indices, which accelerators implement with atomics).

``standard``: stable sort + ``lax.ragged_dot`` (grouped GEMM over the exact group
sizes) and ``sum(weights * y)``. Note XLA:CPU lowers ``ragged_dot`` to a dense masked
GEMM over all experts, so on CPU ``standard`` MoE is slower than ``batch_invariant``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from .collectives import (
    MAX_TP,
    _chunk_partials,
    _chunked_2d,
    _chunked_2d_bwd,
    all_reduce_chunks,
    bound_row_parallel,
)
from .mode import resolve_mode
from .reductions import softmax
from .tiled_matmul import _bi_matmul_2d_bwd, chunked_dot, gemv_matches_gemm, matmul
from .tiling import (
    K_CHUNK,
    ROW_TILE,
    lane_padded,
    ordered_sum,
    pairwise_sum,
    pairwise_tree,
    round_up,
    rounded,
    upcast,
)

GEMV_MAX_ASSIGNMENTS = 4  # gathering each assignment's expert weights only pays off for a few

#: ``path="auto"`` for a small decode batch (<= GEMV_MAX_ASSIGNMENTS assignments, widths
#: allowing GEMV), per lowering platform: the GEMV path only where its equality with the
#: grouped path was measured (module docstring). Other platforms and larger batches: grouped.
AUTO_PATHS: dict[str, str] = {"cpu": "gemv", "cuda": "grouped", "rocm": "grouped", "tpu": "grouped"}


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------


def route_topk(
    router_logits: jax.Array,
    k: int,
    *,
    score_fn: str = "sigmoid",
    correction_bias: jax.Array | None = None,
    normalize: bool = True,
    mode: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-k routing. router_logits [T, E] -> (weights [T, k] f32, experts [T, k] int32).

    ``correction_bias`` [E] only shifts the *selection* (load balancing), not the
    weights. ``normalize`` divides the k weights by their sum.
    """
    mode = resolve_mode(mode)
    logits = router_logits.astype(jnp.float32)
    if score_fn == "sigmoid":
        scores = jax.nn.sigmoid(logits) if mode == "standard" else _sigmoid(logits)
    elif score_fn == "softmax":
        scores = softmax(logits, mode=mode)
    else:
        raise ValueError(f"unknown score_fn {score_fn!r}")
    select = scores if correction_bias is None else scores + correction_bias.astype(jnp.float32)
    _, experts = lax.top_k(select, k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if normalize:
        if mode == "standard":
            denom = jnp.sum(weights, axis=-1, keepdims=True)
            weights = weights / denom
        else:
            weights = _normalize_rows(weights)
    return weights, experts.astype(jnp.int32)


@jax.custom_vjp
def _sigmoid(x):
    """Sigmoid of router logits [T, E] evaluated on lane-padded rows, gradient from the
    saved output (``dy * s * (1 - s)``, nothing re-evaluated). With E = 4..16 experts the
    plain ``jax.nn.sigmoid`` is an ``exp`` over a few lanes, which XLA:CPU rounds
    differently in the vector body and the remainder loop
    (:func:`tml.kernels.tiling.lane_padded`); the backward then reuses the output
    rather than re-evaluating the ``exp`` inside another fusion."""
    return lane_padded(jax.nn.sigmoid, x, -1, fill=0.0)


def _sigmoid_fwd(x):
    s = _sigmoid(x)
    return s, s


def _sigmoid_bwd(s, dy):
    return (dy * s * (1.0 - s),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


@jax.custom_vjp
def _normalize_rows(w):
    """w [T, k] / its pairwise row sum, computed as ``w * (1 / sum)``, forward and backward.

    XLA's simplifier rewrites ``a / broadcast(s)`` into ``a * broadcast(1 / s)`` in some
    programs and not in others (it depends on the surrounding fusion), and the two round
    differently: the router gradient of the same micro-batch then differed between one
    device and a data-parallel rank. The backward's row sum is the fixed pairwise tree
    over :func:`~tml.kernels.tiling.rounded` products, where autodiff would emit an XLA
    reduce of FMA-contractible products.
    """
    return _normalize_rows_fwd(w)[0]


def _normalize_rows_fwd(w):
    r = 1.0 / pairwise_sum(w, -1, keepdims=True)
    y = w * r
    return y, (y, r)


def _normalize_rows_bwd(res, dy):
    y, r = res
    proj = pairwise_sum(rounded(dy * y), -1, keepdims=True)
    return ((dy - proj) * r,)


_normalize_rows.defvjp(_normalize_rows_fwd, _normalize_rows_bwd)


# ---------------------------------------------------------------------------
# dispatch plan
# ---------------------------------------------------------------------------


def _plan(experts: jax.Array, num_experts: int, row_tile: int):
    """Sort assignments by expert and lay them out in whole row tiles.

    experts [T, k] -> dict with
      slot_token [P] token of each padded slot (T for empty slots),
      slot_assign [P] assignment index a = t*k + j of each slot (A for empty),
      assign_slot [A] slot of each assignment,
      tile_expert [n_tiles], used_tiles [] number of tiles holding any assignment.
    """
    T, k = experts.shape
    A = T * k
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignment ids sorted by expert
    sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    padded = (sizes + row_tile - 1) // row_tile * row_tile
    start = jnp.cumsum(sizes) - sizes  # first sorted position of each expert
    pstart = jnp.cumsum(padded) - padded  # first padded slot of each expert
    e_sorted = flat[order]
    rank = jnp.arange(A, dtype=jnp.int32) - start[e_sorted]
    dest = pstart[e_sorted] + rank  # padded slot of the i-th sorted assignment
    P = round_up(A, row_tile) + num_experts * row_tile
    n_tiles = P // row_tile
    assign_slot = jnp.zeros((A,), jnp.int32).at[order].set(dest.astype(jnp.int32))
    slot_assign = jnp.full((P,), A, jnp.int32).at[dest].set(order.astype(jnp.int32))
    slot_token = jnp.where(slot_assign < A, slot_assign // k, T)
    tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * row_tile
    pend = jnp.cumsum(padded)
    # = searchsorted(pend, tile_start, side="right"), written as a count (jnp.searchsorted
    # fails to trace inside a shard_map with varying manual axes in JAX 0.10)
    after = (pend[None, :] <= tile_start[:, None]).sum(1, dtype=jnp.int32)
    tile_expert = jnp.minimum(after, num_experts - 1).astype(jnp.int32)
    used_tiles = pend[-1] // row_tile
    return {
        "slot_token": slot_token,
        "slot_assign": slot_assign,
        "assign_slot": assign_slot,
        "tile_expert": tile_expert,
        "used_tiles": used_tiles,
        "n_tiles": n_tiles,
    }


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch(x, slot_token, assign_slot, k):
    """Rows of x for every padded slot: x [T, D] -> [P, D] (zeros for empty slots)."""
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
    return x_pad[slot_token]


def _dispatch_fwd(x, slot_token, assign_slot, k):
    return _dispatch(x, slot_token, assign_slot, k), (assign_slot, x.shape[0])


def _dispatch_bwd(k, res, g):
    assign_slot, T = res
    per_slot = g[assign_slot.reshape(T, k)]  # [T, k, D]
    return ordered_sum(per_slot, 1), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _scale_rows(h, wt):
    """h [rows, F] * wt [rows, 1], whose wt-gradient is a fixed pairwise row sum.

    Left to autodiff, that gradient is an XLA reduce whose order depends on how the
    surrounding program is fused (it differed between one device and a data-parallel
    rank of the same micro-batch), which would make the router's gradient, and so the
    training run, depend on the number of devices.
    """
    return h * wt


def _scale_rows_fwd(h, wt):
    return h * wt, (h, wt)


def _scale_rows_bwd(res, dy):
    h, wt = res
    return dy * wt, pairwise_sum(rounded(dy * h), -1, keepdims=True)


_scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)


class _Down(NamedTuple):
    """How the expert down projection ``h [rows, F_local] @ w_down[e] [F_local, D]`` is cut.

    The contraction F is cut into ``num_chunks`` canonical chunks (``MAX_TP`` = 8, the
    row-parallel layers' count), whose products are summed in the fixed pairwise tree
    (:func:`tml.kernels.tiling.pairwise_tree`) — the algorithm of
    :func:`tml.kernels.row_parallel_linear`, so the bits do not depend on the TP degree.
    ``axis_name`` None: one device, all chunks local, summed per tile. Else (inside the
    ``shard_map`` of :func:`moe_ffn` over that mesh axis, tp ranks): this rank's
    ``num_chunks / tp`` chunk partials are kept, and reduced across the ranks by the
    ordered ``algorithm`` (:func:`tml.kernels.all_reduce_chunks`) after the tiles.
    """

    num_chunks: int = MAX_TP
    axis_name: str | None = None
    algorithm: str = "one_shot"
    local_chunks: int = MAX_TP

    def tile(self, h, w):
        """h [rows, Fl] @ w [Fl, D] -> [rows, D] (tree-summed) or [local_chunks, rows, D]."""
        if self.axis_name is None:  # gradients: the whole batch-invariant matmuls
            fn = _tile_down if h.shape[0] % ROW_TILE == 0 else _chunked_2d  # (row_tile < 64: matmul pads)
            return fn(h, w, self.num_chunks)
        return _chunk_partials(h, w, self.local_chunks)

    def gemv(self, h, w):
        """h [A, 1, Fl] @ w [A, Fl, D] -> [A, 1, D] or [local_chunks, A, 1, D]: the same chunks
        as :meth:`tile`, each a one-row GEMV per assignment."""
        n = self.num_chunks if self.axis_name is None else self.local_chunks
        c = h.shape[-1] // n
        parts = [chunked_dot(h[..., i * c : (i + 1) * c], w[:, i * c : (i + 1) * c], batched=True) for i in range(n)]
        return pairwise_tree(parts) if self.axis_name is None else jnp.stack(parts)

    def reduce(self, partials, chunk_axis: int):
        """Sum the chunk partials across the ranks (identity on one device, already summed)."""
        if self.axis_name is None:
            return partials
        return all_reduce_chunks(jnp.moveaxis(partials, chunk_axis, 0), self.axis_name, self.algorithm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tile_down(h, w, num_chunks):
    """h [rows, F] @ w [F, D] -> float32 [rows, D]: the F chunks of
    :func:`tml.kernels.collectives._chunked_2d` (each chunk ``matmul(h_c, w_c)``, summed in
    the fixed pairwise tree) as **one** GEMM batched over the chunk index.

    ``rows`` is a whole number of ``ROW_TILE`` tiles (the MoE row tiles), so each chunk's
    ``matmul`` is :func:`~tml.kernels.tiled_matmul.chunked_dot` without row padding, and a
    batched ``dot_general`` element is that GEMM on XLA:CPU (``chunked_dot`` batches its
    own K chunks the same way): the same bits with one GEMM call instead of
    ``num_chunks`` narrow ones per tile (``tests/kernels/test_moe.py`` checks them against
    the per-chunk algorithm, forward and gradients). The backward is ``_chunked_2d``'s:
    the whole matmuls ``dy @ w.T`` and ``h.T @ dy``.
    """
    rows, F = h.shape
    c = F // num_chunks
    hb = upcast(h).reshape(rows, num_chunks, c).transpose(1, 0, 2)  # [C, rows, c]
    wb = upcast(w).reshape(num_chunks, c, w.shape[1])  # [C, c, D], no copy
    parts = chunked_dot(hb, wb, K_CHUNK, batched=True)  # [C, rows, D]
    return pairwise_tree([parts[i] for i in range(num_chunks)])


def _tile_down_fwd(h, w, num_chunks):
    return _tile_down(h, w, num_chunks), (h, w)


_tile_down.defvjp(_tile_down_fwd, _chunked_2d_bwd)


ONE_DEVICE = _Down()  # the down projection's 8 canonical chunks, summed on this device


def _gate_up(x_tile, w_gate, w_up, k_chunk):
    """x_tile [rows, D] @ w_gate, w_up [D, F] -> g, u [rows, F] float32 (the tiled matmul)."""
    kw = {"mode": "batch_invariant", "impl": "reference", "k_chunk": k_chunk, "out_dtype": jnp.float32}
    return matmul(x_tile, w_gate, **kw), matmul(x_tile, w_up, **kw)


def _expert_tile(x_tile, w_gate, w_up, w_down, wt, activation, k_chunk, down):
    """One tile: x_tile [rows, D], wt [rows, 1] routing weights -> [rows, D] float32 (or its
    chunk partials, :class:`_Down`)."""
    g, u = _gate_up(x_tile, w_gate, w_up, k_chunk)
    h = _scale_rows(activation(g) * u, wt)
    return down.tile(h, w_down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _tile_scan(xs_t, ws_t, tile_expert, used, w_gate, w_up, w_down, activation, k_chunk, num_chunks):
    """The one-device grouped expert compute over the padded row tiles.

    xs_t [n, R, D] (x.dtype), ws_t [n, R, 1] f32 routing weights, tile_expert [n] int32,
    used [] int32 (tiles ``>= used`` are skipped, their output zeros), w_gate / w_up
    [E, D, F], w_down [E, F, D] -> ys [n, R, D] float32. Tile i is :func:`_expert_tile`
    with expert ``tile_expert[i]``'s weights, in a ``lax.scan``.

    The backward is written out (it is autodiff's arithmetic, not its data movement):
    a reverse ``lax.scan`` over the tiles — the order in which the transpose of the
    forward scan visits them — gives each tile's input and routing-weight gradients and
    adds its weight gradients (the tile matmuls' ``x.T @ dy`` and the down projection's
    ``h.T @ dy``) into its expert's slice of the [E, ...] accumulators, starting from
    zeros: the same products added in the same order, so the same bits as autodiff of
    the forward scan (``tests/kernels/test_moe.py``, f32 and bf16). Autodiff instead
    saved every tile's [D, F] weight slices as residuals and, per tile, built and added
    full [E, D, F] cotangents (a dynamic-update-slice into zeros, then an add).
    Residuals here: the tiles' gate and up activations g, u [n, R, F] f32.
    """
    return _tile_scan_fwd(xs_t, ws_t, tile_expert, used, w_gate, w_up, w_down, activation, k_chunk, num_chunks)[0]


def _tile_scan_fwd(xs_t, ws_t, tile_expert, used, w_gate, w_up, w_down, activation, k_chunk, num_chunks):
    n, R, D = xs_t.shape
    F = w_gate.shape[2]
    down = _Down(num_chunks)

    def body(carry, inp):
        i, x_tile, w_tile, e = inp

        def compute():
            g, u = _gate_up(x_tile, w_gate[e], w_up[e], k_chunk)
            return down.tile(_scale_rows(activation(g) * u, w_tile), w_down[e]), g, u

        def skip():
            return jnp.zeros((R, D), jnp.float32), jnp.zeros((R, F), jnp.float32), jnp.zeros((R, F), jnp.float32)

        return carry, lax.cond(i < used, compute, skip)

    _, (ys, g, u) = lax.scan(body, None, (jnp.arange(n), xs_t, ws_t, tile_expert))
    return ys, (xs_t, ws_t, tile_expert, used, w_gate, w_up, w_down, g, u)


def _tile_scan_bwd(activation, k_chunk, num_chunks, res, dys):
    xs_t, ws_t, tile_expert, used, w_gate, w_up, w_down, gs, us = res
    n = xs_t.shape[0]
    matmul_bwd = functools.partial(_bi_matmul_2d_bwd, ROW_TILE, k_chunk, "reference")  # matmul's backward

    def tile_grads(x_tile, w_tile, e, g, u, dy):
        wg, wu, wd = w_gate[e], w_up[e], w_down[e]
        p, gate_up_vjp = jax.vjp(lambda g, u: activation(g) * u, g, u)
        h = _scale_rows(p, w_tile)
        dh, dwd = _chunked_2d_bwd(num_chunks, (h, wd), dy)  # _tile_down's backward
        dp, dwt = _scale_rows_bwd((p, w_tile), dh)
        dg, du = gate_up_vjp(dp)
        dx_g, dwg = matmul_bwd((x_tile, wg), dg)
        dx_u, dwu = matmul_bwd((x_tile, wu), du)
        return dx_g + dx_u, dwt, dwg, dwu, dwd

    def body(acc, inp):
        i, x_tile, w_tile, e, g, u, dy = inp

        def skip():
            return (jnp.zeros_like(x_tile), jnp.zeros_like(w_tile), jnp.zeros(w_gate.shape[1:], w_gate.dtype),
                    jnp.zeros(w_up.shape[1:], w_up.dtype), jnp.zeros(w_down.shape[1:], w_down.dtype))

        dx, dwt, *dws = lax.cond(i < used, lambda: tile_grads(x_tile, w_tile, e, g, u, dy), skip)
        acc = tuple(lax.dynamic_update_index_in_dim(a, lax.dynamic_index_in_dim(a, e, 0, keepdims=False) + d, e, 0)
                    for a, d in zip(acc, dws))
        return acc, (dx, dwt)

    zeros = tuple(jnp.zeros(w.shape, w.dtype) for w in (w_gate, w_up, w_down))
    (dwg, dwu, dwd), (dxs, dws) = lax.scan(body, zeros, (jnp.arange(n), xs_t, ws_t, tile_expert, gs, us, dys),
                                          reverse=True)
    return dxs, dws, None, None, dwg, dwu, dwd


_tile_scan.defvjp(_tile_scan_fwd, _tile_scan_bwd)


def _grouped(x, experts, weights, w_gate, w_up, w_down, activation, row_tile, k_chunk, down=ONE_DEVICE):
    T, k = experts.shape
    E = w_gate.shape[0]
    D = x.shape[1]
    plan = _plan(experts, E, row_tile)
    xs = _dispatch(x, plan["slot_token"], plan["assign_slot"], k)  # [P, D]
    wflat = jnp.concatenate([weights.reshape(-1).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])
    ws = wflat[plan["slot_assign"]][:, None]  # [P, 1]
    n_tiles = plan["n_tiles"]
    xs_t = xs.reshape(n_tiles, row_tile, D)
    ws_t = ws.reshape(n_tiles, row_tile, 1)
    if down.axis_name is None:
        ys = _tile_scan(xs_t, ws_t, plan["tile_expert"], plan["used_tiles"], w_gate, w_up, w_down, activation,
                        k_chunk, down.num_chunks)
        return ordered_sum(ys.reshape(n_tiles * row_tile, D)[plan["assign_slot"]].reshape(T, k, D), 1)
    out_shape = (down.local_chunks, row_tile, D)  # tensor-parallel F: autodiff through the tile scan

    def body(carry, inp):
        i, x_tile, w_tile, e = inp

        def compute(_):
            return _expert_tile(x_tile, w_gate[e], w_up[e], w_down[e], w_tile, activation, k_chunk, down)

        y = lax.cond(i < plan["used_tiles"], compute, lambda _: jnp.zeros(out_shape, jnp.float32), None)
        return carry, y

    _, ys = lax.scan(body, None, (jnp.arange(n_tiles), xs_t, ws_t, plan["tile_expert"]))
    ys = down.reduce(jnp.moveaxis(ys, 0, -3).reshape(*out_shape[:-2], n_tiles * row_tile, D), 0)
    return ordered_sum(ys[plan["assign_slot"]].reshape(T, k, D), 1)  # slot order


def _gemv(x, experts, weights, w_gate, w_up, w_down, activation, k_chunk, down=ONE_DEVICE):
    T, k = experts.shape
    D = x.shape[1]
    flat = experts.reshape(-1)
    xa = jnp.repeat(x, k, axis=0)[:, None, :]  # [A, 1, D]
    g = chunked_dot(xa, w_gate[flat], k_chunk, batched=True)
    u = chunked_dot(xa, w_up[flat], k_chunk, batched=True)
    h = activation(g) * u * weights.reshape(-1, 1, 1).astype(jnp.float32)
    y = down.reduce(down.gemv(h, w_down[flat]), 0)[:, 0].reshape(T, k, D)
    return ordered_sum(y, 1)  # slot order


def _standard(x, experts, weights, w_gate, w_up, w_down, activation):
    T, k = experts.shape
    E = w_gate.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros((E,), jnp.int32).at[flat].add(1)
    xs = jnp.repeat(x, k, axis=0)[order].astype(jnp.float32)
    g = lax.ragged_dot(xs, w_gate.astype(jnp.float32), sizes)
    u = lax.ragged_dot(xs, w_up.astype(jnp.float32), sizes)
    y = lax.ragged_dot(activation(g) * u, w_down.astype(jnp.float32), sizes)
    y = jnp.zeros_like(y).at[order].set(y).reshape(T, k, -1)
    return jnp.sum(weights[..., None].astype(jnp.float32) * y, axis=1)


def moe_ffn(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    mode: str | None = None,
    path: str = "auto",
    row_tile: int = ROW_TILE,
    k_chunk: int = K_CHUNK,
    axis: str | None = None,
    num_chunks: int = MAX_TP,
) -> jax.Array:
    """Routed SwiGLU experts; see the module docstring. Returns [T, D] in x.dtype.

    path: ``"auto"`` | ``"grouped"`` | ``"gemv"`` (batch_invariant mode only).
    axis: the *logical* name of the expert width F (the model passes ``"expert_mlp"``):
    inside :func:`tml.kernels.collectives.row_parallel_axes` (entered by
    :func:`tml.parallel.tensor_parallel`) a name bound to a mesh axis of size tp > 1 runs
    the experts as a ``shard_map`` over that axis, F split tp ways, the down projection's
    ``num_chunks`` canonical chunks reduced in the fixed tree (``psum`` in standard).
    Unbound: one device, the same chunks and tree.
    """
    mode = resolve_mode(mode)
    if x.ndim != 2 or experts.shape != weights.shape or experts.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ffn shapes: x {x.shape}, experts {experts.shape}, weights {weights.shape}")
    F = w_gate.shape[2]
    if w_up.shape != w_gate.shape or w_down.shape != (w_gate.shape[0], F, x.shape[1]) or w_gate.shape[1] != x.shape[1]:
        raise ValueError(f"moe_ffn weights: w_gate {w_gate.shape}, w_up {w_up.shape}, w_down {w_down.shape} "
                         f"for x {x.shape}; expected [E, D, F], [E, D, F], [E, F, D]")
    kw = {"activation": activation, "mode": mode, "path": path, "row_tile": row_tile, "k_chunk": k_chunk}
    bound = bound_row_parallel(axis) if axis is not None else None
    if bound is None:
        if mode != "standard" and F % num_chunks:
            raise ValueError(f"d_expert {F} is not divisible into {num_chunks} canonical chunks (the down "
                             f"projection's row-parallel contraction): use a multiple of {num_chunks}")
        return _local_ffn(x, experts, weights, w_gate, w_up, w_down, down=_Down(num_chunks), **kw).astype(x.dtype)
    mesh, mesh_axis, algorithm = bound
    tp = dict(mesh.shape)[mesh_axis]
    if num_chunks % tp or F % num_chunks:
        raise ValueError(f"d_expert {F} on the {mesh_axis!r} axis of size {tp}: the tensor-parallel degree must "
                         f"divide num_chunks={num_chunks} and d_expert must be a multiple of {num_chunks}; pick "
                         f"another degree, or map {axis!r} to null in the sharding rules")
    down = _Down(num_chunks, mesh_axis, algorithm, num_chunks // tp)
    body = functools.partial(_local_ffn, down=down, **kw)
    cols, rows = PartitionSpec(None, None, mesh_axis), PartitionSpec(None, mesh_axis, None)
    out = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(),) * 3 + (cols, cols, rows),
                        out_specs=PartitionSpec(), axis_names=frozenset({mesh_axis}), check_vma=False)(
        x, experts, weights, w_gate, w_up, w_down)
    return out.astype(x.dtype)


def _local_ffn(x, experts, weights, w_gate, w_up, w_down, *, activation, mode, path, row_tile, k_chunk, down):
    """The expert compute of this device's slice of F (all of it unbound) -> [T, D] float32,
    reduced over the ranks of ``down.axis_name`` if any."""
    if mode == "standard":
        out = _standard(x, experts, weights, w_gate, w_up, w_down, activation)
        return out if down.axis_name is None else lax.psum(out, down.axis_name)
    gemv_ok = gemv_matches_gemm(w_gate.shape[2], k_chunk) and gemv_matches_gemm(w_down.shape[2], k_chunk)
    grouped = functools.partial(_grouped, activation=activation, row_tile=row_tile, k_chunk=k_chunk, down=down)
    gemv = functools.partial(_gemv, activation=activation, k_chunk=k_chunk, down=down)
    if path == "auto":
        if experts.size > GEMV_MAX_ASSIGNMENTS or not gemv_ok:
            path = "grouped"
        else:  # small decode batch: AUTO_PATHS, decided when lowering for each platform
            paths = {"gemv": gemv, "grouped": grouped}
            per_platform = {platform: paths[p] for platform, p in AUTO_PATHS.items()}
            return lax.platform_dependent(x, experts, weights, w_gate, w_up, w_down, **per_platform, default=grouped)
    if path == "gemv":
        if not gemv_ok:
            raise ValueError(
                "the gemv path matches the grouped path only when d_expert (per tensor-parallel rank) and "
                "d_model are multiples of 64 (see tiled_matmul.GEMV_COLS_MULTIPLE); use path='grouped'"
            )
        return gemv(x, experts, weights, w_gate, w_up, w_down)
    if path == "grouped":
        return grouped(x, experts, weights, w_gate, w_up, w_down)
    raise ValueError(f"unknown path {path!r}")
