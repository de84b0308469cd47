"""Attention against a paged KV cache, visiting only the splits that hold visible keys,
and the one paged cache write.

Shapes::

    paged_attention(q [B, C, Hq, D], k_pages, v_pages [n_pages, page_size, Hkv, D],
                    page_table int32 [B, P], *, q_positions int32 [B, C],
                    kv_lengths int32 [B], sliding_window, scale, split_size, mode, impl)
        -> [B, C, Hq, D] (dtype of q)
    paged_write(k_pages, v_pages, page_table [B, P], k_new, v_new [B, C, Hkv, D],
                start int32 [B], n_new int32 [B]) -> (k_pages, v_pages)

A session's slot ``s`` (its logical KV position) lives in page ``page_table[b, s //
page_size]`` at offset ``s % page_size``; ``page_size`` is a multiple of the split size,
so a split never straddles two pages and the split a key falls in depends on its slot
only (as in :func:`tml.kernels.attention`). Entries of ``page_table`` past a session's
pages are ignored (any value in ``[0, n_pages)``); slots ``>= kv_lengths[b]`` (and
slots past the session's ``P`` pages) are invisible. Causal within the session,
optional sliding window, one session per row (no segments). Pool contents outside the
visible slots must be finite (a zero-initialised pool is): a masked key gets weight 0,
and ``0 * inf`` would be NaN.

**The skipping rule** (the same exact rule as the training rows of
:func:`tml.kernels.attention`): a split whose keys are all invisible to a query row
yields ``c_s = NEG, l_s = 0, o_s = 0``, and :func:`tml.kernels.split_kv.combine` then
leaves that row's running ``(c, l, o)`` bit for bit unchanged (the state's rescale
factor is exactly ``2^0 = 1`` and the split's is flushed to 0, or both are 1 on an
empty state), so not visiting the split changes no bits
(``tests/kernels/test_paged_attention.py::test_fully_masked_split_leaves_state_unchanged``).
``batch_invariant`` therefore runs one ``lax.while_loop`` over the split index ``j``
from the lowest first-visible split to the highest last-visible split over the batch,
``splits_per_step`` (default 8) splits per step: each step gathers splits ``j .. j+7`` of
every session from its pages (a page holds ``page_size / split_size`` splits), computes
their partials batched and folds them in one by one, in order, with the helpers of
:mod:`tml.kernels.split_kv` (the jnp reference's arithmetic, op for op; a step's splits
outside the range are fully masked, so the step size changes no bits — it divides the
loop's per-step overhead: 42 → 21 ms for one decode query against 36k keys on the loaded
2-core CPU). A session
whose own range does not contain ``j`` sees a fully masked split, so its bits never
depend on what it is batched with, and they equal ``attention`` over its pages laid end
to end — and therefore the training row's attention at the same positions.

Cost: proportional to the visited splits; neither the run time nor the compiled
program grows with ``n_pages`` or ``P`` (``python -m tml.kernels.bench --paged``;
figures in ``kernels/README.md``). Put a padded chunk's padding queries at a real
query's position so they do not widen the loop (they never change the real rows' bits).

``standard``: gather the session's pages to contiguous keys and run the dense
``standard`` attention. ``impl="pallas"`` (the ``auto`` choice on GPU/TPU): the pages are
gathered contiguous and the Pallas split-KV forward runs over them (same bits; cost
grows with ``P``, not with the pool) — a Pallas kernel that gathers split ``j`` itself
is not written yet. No gradient: ``while_loop`` has no reverse mode (training rows use
:func:`tml.kernels.attention`).

:func:`paged_write` is the write side: row ``i < n_new[b]`` of session ``b`` goes to slot
``start[b] + i`` through its page table; padding rows (``i >= n_new``) and slots past the
session's ``P`` pages are scattered to an out-of-range page index with ``mode="drop"``,
so **a write can never land outside the session's own pages**.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from .mode import resolve_impl, resolve_mode
from .pallas.attention_kernel import attention_forward
from .split_kv import (
    MIN_PV_COLS,
    NEG,
    PAD_QUERY_SEGMENT,
    SEGMENT_SENTINEL,
    combine,
    finalize,
    init_state,
    prepare,
    prepare_queries,
    split_partials,
    unprepare,
    visible,
)
from .split_kv_attention import _standard
from .tiling import LANES, SPLIT_SIZE, pad_axis, round_up, upcast

_HIGHEST = lax.Precision.HIGHEST
SPLITS_PER_STEP = 8  # splits gathered and folded per loop step (no bits depend on it)


def _check(q, k_pages, v_pages, page_table, q_positions, kv_lengths, split_size):
    if q.ndim != 4 or k_pages.ndim != 4:
        raise ValueError(f"paged_attention: q must be [B, C, Hq, D] and k_pages [n_pages, page_size, Hkv, D], "
                         f"got q {q.shape}, k_pages {k_pages.shape}")
    B, C, Hq, D = q.shape
    n_pages, page_size, Hkv, Dk = k_pages.shape
    if v_pages.shape != k_pages.shape or Dk != D or Hq % Hkv:
        raise ValueError(f"paged_attention shapes: q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape} "
                         "(need equal k/v pools, the head dim of q, and Hq a multiple of Hkv)")
    if page_size % split_size:
        raise ValueError(f"page_size {page_size} must be a multiple of split_size {split_size}: "
                         "allocate pages of whole attention splits")
    if page_table.ndim != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table must be int32 [B={B}, P], got {page_table.shape}")
    if tuple(q_positions.shape) != (B, C) or tuple(kv_lengths.shape) != (B,):
        raise ValueError(f"q_positions must be [B, C] = {(B, C)} and kv_lengths [B] = {(B,)}, "
                         f"got {q_positions.shape} and {kv_lengths.shape}")


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """pages [n_pages, page_size, H, D], page_table [B, P] -> each session's slots laid
    end to end [B, P * page_size, H, D]."""
    n_pages, page_size = pages.shape[:2]
    B, P = page_table.shape
    g = pages[jnp.clip(page_table, 0, n_pages - 1)]
    return g.reshape(B, P * page_size, *pages.shape[2:])


def split_range(q_pos, real, n_valid, window, split_size):
    """Splits ``[j_lo, j_hi]`` (inclusive; empty if ``j_hi < j_lo``) holding a key visible
    to some real query row of some session. q_pos, real [B, R]; n_valid [B] -> int32 scalars."""
    big = jnp.iinfo(jnp.int32).max
    pos_hi = jnp.max(jnp.where(real, q_pos, -1), axis=1)
    last_key = jnp.minimum(pos_hi, n_valid - 1)  # [B]; < 0: the session sees nothing
    hi = jnp.where(last_key >= 0, last_key // split_size, -1)
    if window is None:
        lo = jnp.zeros_like(hi)
    else:
        pos_lo = jnp.min(jnp.where(real, q_pos, big), axis=1)
        lo = jnp.maximum(pos_lo - (window - 1), 0) // split_size
    has = hi >= lo
    j_lo = jnp.min(jnp.where(has, lo, big))
    j_hi = jnp.max(jnp.where(has, hi, -1))
    return j_lo.astype(jnp.int32), j_hi.astype(jnp.int32)


def _paged_reference(qs, q_pos, q_seg, k_pages, v_pages, page_table, kv_lengths, window, split_size,
                     splits_per_step=SPLITS_PER_STEP):
    """The split loop on the kernel layout: qs [B,H,R,D] -> (out [B,H,R,Dv], c, l [B,H,R,1]).

    Each loop step gathers ``splits_per_step`` (U) consecutive splits of every session,
    computes their partials batched (the trainer's :func:`reference_forward` arithmetic:
    scores [B, H, U, R, S]) and folds them in split by split, in order. A split of the
    step outside ``[j_lo, j_hi]`` (or past a session's keys) is fully masked, which leaves
    the state bit for bit unchanged (the skipping rule), so U changes no bits; it only
    divides the loop's per-step overhead (several small ops per step) by U."""
    B, H, R, D = qs.shape
    n_pages, page_size = k_pages.shape[:2]
    P = page_table.shape[1]
    S, U = split_size, int(splits_per_step)
    per_page = page_size // S
    Dv = max(D, MIN_PV_COLS)
    Rl = round_up(max(R, 1), LANES)  # per-row state a multiple of LANES long, as reference_forward
    n_valid = jnp.minimum(jnp.asarray(kv_lengths, jnp.int32), P * page_size)
    j_lo, j_hi = split_range(q_pos, q_seg != PAD_QUERY_SEGMENT, n_valid, window, S)
    step_lo = j_lo // U
    step_hi = jnp.where(j_hi >= j_lo, j_hi // U, step_lo - 1)  # empty range: no step
    table = jnp.clip(jnp.asarray(page_table, jnp.int32), 0, n_pages - 1)
    offsets = jnp.arange(S, dtype=jnp.int32)
    qb = jnp.broadcast_to(qs[:, :, None], (B, H, U, R, D))
    qp = q_pos[:, None, None, :, None]
    qg = q_seg[:, None, None, :, None]

    def body(t, state):
        js = t * U + jnp.arange(U, dtype=jnp.int32)  # [U] the step's splits
        page = table[:, jnp.minimum(js // per_page, P - 1)]  # [B, U]
        rows = (js % per_page)[:, None] * S + offsets[None, :]  # [U, S] offsets inside the page
        k = k_pages[page[:, :, None], rows[None]]  # [B, U, S, Hkv, D]
        v = v_pages[page[:, :, None], rows[None]]
        kf = upcast(k).astype(jnp.float32).transpose(0, 3, 1, 2, 4)  # [B, H, U, S, D]
        vf = pad_axis(upcast(v).astype(jnp.float32).transpose(0, 3, 1, 2, 4), 4, Dv)
        s = lax.dot_general(qb, kf, (((4,), (4,)), ((0, 1, 2), (0, 1, 2))), precision=_HIGHEST,
                            preferred_element_type=jnp.float32)  # [B, H, U, R, S]
        kv_idx = js[:, None] * S + offsets[None, :]  # [U, S]
        kv_seg = jnp.where(kv_idx[None] < n_valid[:, None, None], 0, SEGMENT_SENTINEL)  # [B, U, S]
        mask = visible(qp, qg, kv_idx[None, None, :, None, :], kv_seg[:, None, :, None, :], True, window)
        c_s, l_s, o_s = split_partials(s, mask, vf)  # [B, H, U, R, 1|Dv]
        c_s, l_s, o_s = pad_axis(c_s, 3, Rl, NEG), pad_axis(l_s, 3, Rl), pad_axis(o_s, 3, Rl)
        for u in range(U):
            state = combine(state, c_s[:, :, u], l_s[:, :, u], o_s[:, :, u])
        return state

    state = lax.fori_loop(step_lo, step_hi + 1, body, init_state((B, H, Rl), Dv))
    out, c, l = finalize(state)
    return out[:, :, :R], c[:, :, :R], l[:, :, :R]


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    *,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    sliding_window: int | None = None,
    scale: float | None = None,
    split_size: int = SPLIT_SIZE,
    mode: str | None = None,
    impl: str | None = None,
    splits_per_step: int = SPLITS_PER_STEP,
) -> jax.Array:
    """Causal grouped-query attention of a chunk of queries against each session's pages;
    see the module docstring. -> [B, C, Hq, D] (dtype of q). ``splits_per_step``: splits
    the ``batch_invariant`` reference loop gathers per step (speed only, no bits)."""
    q_positions = jnp.asarray(q_positions, jnp.int32)
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    page_table = jnp.asarray(page_table, jnp.int32)
    _check(q, k_pages, v_pages, page_table, q_positions, kv_lengths, int(split_size))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = None if sliding_window is None else int(sliding_window)
    B, C = q.shape[:2]
    if resolve_mode(mode) == "standard":
        k, v = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)
        zeros_q, zeros_k = jnp.zeros((B, C), jnp.int32), jnp.zeros((B, k.shape[1]), jnp.int32)
        return _standard(q, k, v, q_positions, zeros_q, zeros_k, kv_lengths, True, window, scale)
    if resolve_impl(impl) == "pallas":
        k, v = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)
        L = prepare(q, k, v, q_positions, jnp.zeros((B, C), jnp.int32), None, kv_lengths, scale, int(split_size))
        out = attention_forward(L, causal=True, window=window, split_size=int(split_size))[0]
        return unprepare(out, q.shape, q.dtype)
    qs, q_pos, q_seg = prepare_queries(q, q_positions, jnp.zeros((B, C), jnp.int32), k_pages.shape[2], scale)
    out = _paged_reference(qs, q_pos, q_seg, k_pages, v_pages, page_table, kv_lengths, window, int(split_size),
                           int(splits_per_step))[0]
    return unprepare(out, q.shape, q.dtype)


def paged_write(
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    start: jax.Array,
    n_new: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Write rows ``i < n_new[b]`` of k_new, v_new [B, C, Hkv, D] at slots ``start[b] + i``
    of each session through page_table [B, P] -> the pools (cast to the pool dtype).

    Padding rows (``i >= n_new[b]``), negative slots and slots past the session's ``P``
    pages are dropped (scattered to page index ``n_pages`` with ``mode="drop"``): nothing
    is ever written outside the session's own pages. Sessions must own distinct pages
    (two sessions writing one slot would race)."""
    n_pages, page_size = k_pages.shape[:2]
    B, C = k_new.shape[:2]
    P = page_table.shape[1]
    if k_new.shape != v_new.shape or k_new.shape[2:] != k_pages.shape[2:] or v_pages.shape != k_pages.shape:
        raise ValueError(f"paged_write shapes: k_new {k_new.shape}, v_new {v_new.shape} must be [B, C] + "
                         f"the pool's {k_pages.shape[2:]}; k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    if page_table.shape[0] != B:
        raise ValueError(f"page_table must be [B={B}, P], got {page_table.shape}")
    start = jnp.asarray(start, jnp.int32).reshape(B)
    n_new = jnp.asarray(n_new, jnp.int32).reshape(B)
    i = jnp.arange(C, dtype=jnp.int32)[None, :]
    slot = start[:, None] + i  # [B, C]
    keep = (i < n_new[:, None]) & (slot >= 0) & (slot < P * page_size)
    logical = jnp.clip(slot // page_size, 0, P - 1)
    page = jnp.take_along_axis(jnp.asarray(page_table, jnp.int32), logical, axis=1)
    page = jnp.where(keep, page, n_pages)  # out of range: dropped
    off = jnp.where(keep, slot % page_size, 0)
    k = k_pages.at[page, off].set(k_new.astype(k_pages.dtype), mode="drop")
    v = v_pages.at[page, off].set(v_new.astype(v_pages.dtype), mode="drop")
    return k, v
