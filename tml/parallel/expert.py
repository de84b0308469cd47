"""Expert parallelism: MoE dispatch over the ``expert`` mesh axis with all-to-all, the
expert weights never gathered — applied from outside the model, like tensor parallelism.

The MoE layer (:class:`tml.model.moe.MoE`) calls :func:`moe_ffn` of this module, which is
:func:`tml.kernels.moe_ffn` on one device. Inside :func:`expert_parallel` it runs a
``shard_map`` (manual over every mesh axis) in which::

    x [T, D], experts [T, k], weights [T, k]   tokens split over the token axes (the
                                               "batch" rule's mesh axes, expert included)
    w_gate / w_up [E/ep, D, F], w_down [E/ep, F, D]   experts split over ``axis`` (ep ranks)

(the expert weights enter gathered over ``fsdp`` / ``tensor``, never over ``axis``; the
ranks of a ``tensor`` axis, which splits no token, compute the same rows):

1. **route** — each rank's tokens arrive already routed (the router is per token); the
   assignment ``a = t*k + j`` goes to rank ``experts[t, j] // (E/ep)``, the owner of its
   expert, at position ``p`` = its rank among this rank's assignments to that owner, in
   assignment order;
2. **dispatch** — a send buffer ``[ep, C, D]`` of the token rows (plus the local expert id
   and the routing weight of each row) goes through ``lax.all_to_all`` over ``axis``;
3. **expert compute** — the owner moves the received rows of every source, in source
   order, ahead of the empty ones and runs :func:`tml.kernels.moe_ffn` (the grouped,
   batch-invariant tile matmuls, routing weight applied before the down projection) with
   one slot per row;
4. **return and combine** — the reverse ``all_to_all`` brings every row back to its
   sender's buffer slot, and a token's k outputs are added in slot order ``j = 0..k-1``
   (``tml.kernels.ordered_sum``, as in ``moe_ffn``; ``jnp.sum`` in ``standard``).

**Capacity** (rows per (source, destination) pair, static shapes): by default the worst
case, ``C = T * min(k, E/ep)`` (top-k picks k distinct experts, at most ``E/ep`` of them on
one owner), so *no assignment can ever overflow*: dropless, like the one-device layer, at
the price of buffers and owner compute over ``ep * C`` rows where ``T * k`` are used
(empty rows are zero rows, ``ep * min(k, E/ep) / k`` times the routed work: 8x for
``tml_interaction_small``'s 232 experts, top-6, on ``expert=8``; with a capacity factor
it is ``f`` x). With
``capacity_factor=f`` the buffer is ``C = min(worst, ceil(f * T * k / ep))``; an
assignment past C contributes nothing to its token (GShard-style drop), and never
silently: a host callback adds the overflow count summed over all ranks to
:func:`dropped_assignments` and warns, and the ``expert_parallel`` block raises
:class:`ExpertCapacityError` on exit (after ``jax.effects_barrier``) if a program run
inside it dropped any, naming the count and the fix. (Raising *inside* the callback
would abort the process: the other devices would wait forever in the next all-to-all.)

**Bits** (``tests/parallel/test_expert_parallel.py``, 8 fake CPU devices, 128 tokens, 8
experts, top-2): in ``batch_invariant`` mode the forward and every gradient (of x, the
routing weights and the three expert weights) at EP = 2, 4, 8 are raw-bit equal to one
device in float32 — expert parallelism is **bitwise invariant to its degree** — and
repeat run to run (the same program, and re-traced). Why: a row's expert
output depends only on that row, its expert and its routing weight (the tile matmul is
row-invariant); the all-to-alls only move rows; the owner computes and returns float32
rows (exact upcasts: on XLA:CPU the f32 x bf16 tile matmul has the bf16 x bf16 bits), so
nothing is rounded before the combine, which — like the dispatch's backward — adds the
k slots in the one fixed order; and an owner sees exactly the rows of its experts in the
global (token, slot) order (sources in rank order, each in assignment order, the empty
rows after them), so its tiles hold the rows of the one-device tiles and the expert
weight gradients are the same sums. With a ``data`` (or ``fsdp``) axis beside ``expert``
each data group holds a share of every expert's rows and the expert weight gradients
are a compiler-ordered sum over the groups: measured on data 2 x expert 4, forward and
the x / routing-weight gradients bitwise (the tiny model's logits too), expert weight
gradients within 4e-6, not bitwise; the tiny model's training-step gradients
(``tml.train.step``, GSPMD for the rest of the model) within 5e-7 of each parameter's
largest, the expert load bitwise. In ``standard`` mode (``ragged_dot``, ``jnp.sum``)
the routing-weight gradient differs at EP = 8.

bfloat16 (EP = 4): the forward and the routing / expert weight gradients are bitwise; the
x gradient is not (max 1.6e-2 at |dx| <= 3.1, 36% of the entries): fed float32 rows,
``kernels.moe_ffn``'s backward adds the gate and up products' x gradients in float32 and
rounds once, where one device rounds each to bfloat16 before adding. Fed bfloat16 rows
instead, its output cast would round each slot before the combine and the forward would
differ. The fix is a float32 output option on ``kernels.moe_ffn`` (its final cast is the
only rounding in the way), not made here.

Cost: the return all-to-all carries float32 rows (twice a bfloat16 model's bytes), and
the owner computes over all ``ep * C`` buffer rows (see Capacity).

Errors: an ``axis`` size that does not divide ``n_experts``, or a token count (rows x
length of a micro-batch) not divisible by the number of token shards, raise a
``ValueError`` at trace time saying what to change.

    mesh = make_mesh(MeshConfig(data=-1, expert=4))
    model = shard_model(model, DEFAULT_RULES, mesh)
    with expert_parallel(mesh):
        out = nnx.jit(lambda m, b: m(b))(model, shard_batch(batch, mesh))

The binding is a ``jax.make_user_context`` value, part of every jit cache key (like the
kernel mode and :func:`tml.parallel.tensor_parallel`): a program traced outside the block
is never reused inside it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from tml import kernels
from tml.parallel.sharding import Rules, normalize_rules


class ExpertCapacityError(RuntimeError):
    """Raised on leaving an :func:`expert_parallel` block with a ``capacity_factor`` when a
    program run inside it had (token, slot) assignments that did not fit the
    per-(source, destination) buffer."""


_dropped: list[int] = [0]  # assignments dropped by capacity overflow in this process


def dropped_assignments() -> int:
    """(Token, slot) assignments dropped by a ``capacity_factor`` overflow in this process
    so far (waits for the pending programs' callbacks)."""
    jax.effects_barrier()
    return _dropped[0]


class ExpertParallel(NamedTuple):
    """A binding of :func:`expert_parallel`: the experts split over mesh axis ``axis``, the
    tokens over ``token_axes`` (in that order; ``axis`` among them); ``capacity_factor``
    ``None`` = dropless worst-case buffers."""

    mesh: Any
    axis: str
    token_axes: tuple[str, ...]
    capacity_factor: float | None


_bound = jax.make_user_context(None)  # ExpertParallel | None, in every jit cache key


def token_mesh_axes(mesh, axis: str = "expert", rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes splitting the MoE layer's tokens: the ``"batch"`` rule's axes of size
    > 1, in rule order, with ``axis`` appended if the rule lacks it (every expert-parallel
    rank routes its own tokens)."""
    table = normalize_rules(rules, mesh)
    sizes = dict(mesh.shape)
    axes = [a for a in table.get("batch", ()) if sizes[a] > 1]
    if axis not in axes:
        axes.append(axis)
    return tuple(axes)


@contextlib.contextmanager
def expert_parallel(mesh, axis: str = "expert", *, rules: Rules | None = None,
                    capacity_factor: float | None = None) -> Iterator[ExpertParallel | None]:
    """Run the MoE layers traced inside the block expert-parallel over ``mesh`` (see the
    module docstring). rules: for the token axes (``None`` = :data:`~tml.parallel.DEFAULT_RULES`).
    capacity_factor: ``None`` (dropless) or ``f > 0``. An ``axis`` of size 1 binds nothing
    (the one-device layer). Yields the binding (or ``None``)."""
    sizes = dict(mesh.shape)
    if axis not in sizes:
        raise ValueError(f"expert-parallel axis {axis!r} is not an axis of the mesh {sizes}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless); got {capacity_factor!r}")
    binding = None
    if sizes[axis] > 1:
        binding = ExpertParallel(mesh, axis, token_mesh_axes(mesh, axis, rules),
                                 None if capacity_factor is None else float(capacity_factor))
    before = dropped_assignments() if capacity_factor is not None else 0
    with _bound(binding):
        yield binding
    if capacity_factor is not None and (n := dropped_assignments() - before):
        raise ExpertCapacityError(
            f"{n} MoE (token, slot) assignments did not fit the expert-parallel buffer of capacity_factor="
            f"{capacity_factor} and were dropped; raise capacity_factor or use capacity_factor=None "
            f"(dropless, worst-case buffers)")


def bound_expert_parallel() -> ExpertParallel | None:
    """The active :func:`expert_parallel` binding, or ``None``."""
    return _bound.value


def capacity(tokens: int, k: int, local_experts: int, ep: int, capacity_factor: float | None) -> int:
    """Rows per (source, destination) pair for ``tokens`` tokens per rank: the worst case
    ``tokens * min(k, local_experts)`` (``capacity_factor=None``), else
    ``min(worst, ceil(capacity_factor * tokens * k / ep))``."""
    worst = tokens * min(k, local_experts)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * tokens * k / ep)))


def moe_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
            w_down: jax.Array, *, activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
            mode: str | None = None, path: str = "auto", row_tile: int = kernels.ROW_TILE,
            k_chunk: int = kernels.K_CHUNK) -> jax.Array:
    """:func:`tml.kernels.moe_ffn` (same arguments, x [T, D] -> [T, D]), expert-parallel
    with all-to-all inside :func:`expert_parallel`."""
    kw = {"activation": activation, "mode": mode, "path": path, "row_tile": row_tile, "k_chunk": k_chunk}
    binding = bound_expert_parallel()
    if binding is None:
        return kernels.moe_ffn(x, experts, weights, w_gate, w_up, w_down, **kw)
    return _expert_parallel_ffn(binding, x, experts, weights, w_gate, w_up, w_down, **kw)


def _expert_parallel_ffn(b: ExpertParallel, x, experts, weights, w_gate, w_up, w_down, **kw):
    sizes = dict(b.mesh.shape)
    ep = sizes[b.axis]
    n_experts = w_gate.shape[0]
    if n_experts % ep:
        divisors = [d for d in range(1, n_experts + 1) if n_experts % d == 0]
        raise ValueError(f"n_experts={n_experts} is not divisible by the {b.axis!r} mesh axis of size {ep}: "
                         f"use an expert-parallel degree dividing it ({divisors})")
    if x.ndim != 2 or experts.shape != weights.shape or experts.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ffn shapes: x {x.shape}, experts {experts.shape}, weights {weights.shape}")
    shards = math.prod(sizes[a] for a in b.token_axes)
    if x.shape[0] % shards:
        raise ValueError(
            f"{x.shape[0]} MoE tokens (rows x length) are not divisible by the {shards} token shards of the "
            f"mesh axes {list(b.token_axes)} ({ {a: sizes[a] for a in b.token_axes} }): use a (micro-)batch "
            f"whose rows x length is a multiple of {shards}, or a smaller data / expert degree")
    tokens, k = experts.shape[0] // shards, experts.shape[1]
    cap = capacity(tokens, k, n_experts // ep, ep, b.capacity_factor)
    body = functools.partial(_rank_ffn, axis=b.axis, ep=ep, cap=cap, token_axes=b.token_axes,
                             mode=kernels.resolve_mode(kw.pop("mode")), **kw)
    tok = PartitionSpec(b.token_axes if len(b.token_axes) > 1 else b.token_axes[0])
    wspec = PartitionSpec(b.axis)
    y, dropped = jax.shard_map(body, mesh=b.mesh, in_specs=(tok, tok, tok, wspec, wspec, wspec),
                               out_specs=(tok, PartitionSpec()), check_vma=False)(
        x, experts, weights, w_gate, w_up, w_down)
    if b.capacity_factor is not None:
        jax.debug.callback(functools.partial(_count_overflow, cap=cap, factor=b.capacity_factor), dropped)
    return y


def _count_overflow(dropped, *, cap: int, factor: float) -> None:
    """Host side of the overflow count: add it up and warn (never raise here, see the module
    docstring)."""
    n = int(dropped)
    if n:
        _dropped[0] += n
        warnings.warn(f"{n} MoE (token, slot) assignments did not fit the expert-parallel buffer of {cap} rows "
                      f"per (source, destination) pair (capacity_factor={factor}) and were dropped",
                      RuntimeWarning, stacklevel=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _send_rows(x, src_token, slot, k):
    """x [T, D] -> the send buffer [S, D]: row ``src_token[s]`` (T = empty: zeros) per slot.

    Backward: each token's k slot gradients (``slot`` [T*k], S = dropped: zero) added in
    slot order, as the dispatch of :func:`tml.kernels.moe_ffn` does, so no scatter-add with
    colliding indices decides the order."""
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)[src_token]


def _send_rows_fwd(x, src_token, slot, k):
    return _send_rows(x, src_token, slot, k), (slot, x.shape[0])


def _send_rows_bwd(k, res, g):
    slot, T = res
    g = jnp.concatenate([g, jnp.zeros((1, g.shape[1]), g.dtype)], axis=0)
    return kernels.ordered_sum(g[slot.reshape(T, k)], 1), None, None


_send_rows.defvjp(_send_rows_fwd, _send_rows_bwd)


def _rank_ffn(x, experts, weights, w_gate, w_up, w_down, *, axis, ep, cap, token_axes, mode, **kw):
    """One rank: x [T, D], experts / weights [T, k], w_* [E/ep, ...] -> ([T, D], dropped [])."""
    T, k = experts.shape
    e_local = w_gate.shape[0]
    A, S = T * k, ep * cap
    flat = experts.reshape(A)
    dest = flat // e_local
    hit = (dest[:, None] == jnp.arange(ep, dtype=dest.dtype)[None, :]).astype(jnp.int32)  # [A, ep]
    pos = jnp.take_along_axis(jnp.cumsum(hit, axis=0), dest[:, None], axis=1)[:, 0] - 1
    keep = pos < cap
    slot = jnp.where(keep, dest * cap + pos, S).astype(jnp.int32)  # [A]; S = dropped
    # assignment of each send slot (A = empty); the dropped all land on the extra slot S
    slot_assign = jnp.full((S + 1,), A, jnp.int32).at[slot].set(jnp.arange(A, dtype=jnp.int32))[:S]
    filled = slot_assign < A
    a = jnp.minimum(slot_assign, A - 1)
    send_x = _send_rows(x, jnp.where(filled, slot_assign // k, T), slot, k)  # [S, D]
    send_w = jnp.where(filled, weights.reshape(A)[a], jnp.zeros((), weights.dtype))  # [S]
    send_e = jnp.where(filled, (flat - dest * e_local)[a], -1)  # local expert id, -1 = empty

    a2a = functools.partial(lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0, tiled=True)
    rx, rw, re = a2a(send_x), a2a(send_w), a2a(send_e)  # [S, ...]: source r's rows at [r*cap, (r+1)*cap)
    # used rows first (sources in rank order, each in its assignment order), then the empty
    # ones (zero rows, weight 0, on the last expert, so after all of its used rows)
    order = jnp.argsort(re < 0, stable=True)
    back = jnp.argsort(order)
    e_rows = jnp.where(re < 0, e_local - 1, re)[order][:, None]
    # float32 rows in and out (exact upcasts): the per-slot outputs stay unrounded until the
    # combine, as inside moe_ffn (on XLA:CPU an f32 x bf16 tile matmul has the bf16 x bf16 bits)
    f32 = jnp.float32
    y = kernels.moe_ffn(rx[order].astype(f32), e_rows, rw[order][:, None].astype(f32), w_gate, w_up, w_down,
                        mode=mode, **kw)
    y = a2a(y[back])  # [S, D] back in this rank's send slots
    y = jnp.concatenate([y, jnp.zeros((1, y.shape[1]), y.dtype)], axis=0)[slot].reshape(T, k, -1)
    out = jnp.sum(y, axis=1) if mode == "standard" else kernels.ordered_sum(y, 1)  # slot order
    dropped = lax.psum(jnp.sum(~keep, dtype=jnp.int32), token_axes)
    return out.astype(x.dtype), dropped
