"""The sessions' keys and values between calls: :class:`KVCache` (all layers, owned by
the sampler) and :class:`LayerKV` (one layer's view, what a block reads and writes);
:class:`PagedKVCache` / :class:`PagedLayerKV` the same over one pool of pages shared by
all sessions (the streaming sampler's, :mod:`tml.sampler`).

Both caches give the model the same three things: ``attention_mask(n_new, chunk)`` (the
keys a chunk's queries see, with an ``attend(q, k, v, window)`` method),
``layer(i, n_new)`` (a view whose ``write`` is the one cache write) and
``appended(ks, vs, n_new)`` (the cache after the chunk, from each layer's written
buffers ``ks, vs``: n_layers arrays, what the views' ``write`` returned).

Storage: :class:`KVCache` stacks the layers (k, v [n_layers, B, capacity, Hkv, hd]; the
trainer-side incremental forward, small). :class:`PagedKVCache` keeps **one pool per
layer** (k, v tuples of n_layers [n_pages, page_size, Hkv, hd]): ``layer(i)`` hands out
pool i itself and ``appended`` regroups the written pools into a tuple, so inside a
jitted call whose pools are donated each layer's write is a scatter into its own input
buffer, done in place — no slice of a stacked pool, no restack, so no per-call cost grows
with the pool size (``tests/sampler/test_paged_cache.py``; a stacked pool copied all of
it twice per call).

A chunk of C tokens is written at slots ``[length, length + C)`` of each session; the
slot is the attention kernel's key index, so the split a key falls in depends on its
logical position only (a paged cache must keep that: pages a multiple of the split
size). :meth:`LayerKV.write` is the one place keys are written.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tml import kernels
from tml.model.config import ModelConfig
from tml.model.layers import AttentionMask

_write_rows = jax.vmap(lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=0))


class LayerKV(NamedTuple):
    """One layer's cache: k, v [B, capacity, Hkv, hd]; start int32 [B] first free slot."""

    k: jax.Array
    v: jax.Array
    start: jax.Array

    def write(self, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
        """k_new, v_new [B, C, Hkv, hd] written at slots ``[start, start + C)`` → the
        buffers k, v [B, capacity, Hkv, hd] attention reads (cast to the cache dtype).

        The caller keeps ``start + C <= capacity``: ``dynamic_update_slice`` clamps the
        start, so a chunk past the end would overwrite the session's older slots."""
        return (_write_rows(self.k, k_new.astype(self.k.dtype), self.start),
                _write_rows(self.v, v_new.astype(self.v.dtype), self.start))


class KVCache(NamedTuple):
    """Per-session keys and values, owned by the sampler.

    k, v: [n_layers, B, capacity, Hkv, hd]; lengths: int32 [B] valid slots per session.
    Slots at or beyond a session's length may hold anything finite (a chunk's padding is
    overwritten by the next chunk).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def attention_mask(self, n_new: jax.Array, chunk: int) -> AttentionMask:
        return AttentionMask.for_cache(self.lengths, n_new, chunk, self.capacity)

    def layer(self, i: int, n_new: jax.Array | None = None) -> LayerKV:
        """Layer i's view (n_new unused: a chunk's padding is overwritten by the next chunk)."""
        return LayerKV(self.k[i], self.v[i], self.lengths)

    def appended(self, ks: list[jax.Array], vs: list[jax.Array], n_new: jax.Array) -> "KVCache":
        """The cache after a chunk: every layer's written buffers (from
        :meth:`LayerKV.write`) and lengths grown by n_new [B]."""
        return KVCache(jnp.stack(ks), jnp.stack(vs), self.lengths + n_new)


# ------------------------------------------------------------------------ paged cache
RESERVED_PAGE = 0  # never handed to a session (tml.sampler.pages); writes aimed at it are dropped


def paged_write(k_pages, v_pages, page_table, k_new, v_new, start, n_new):
    """Rows ``i < n_new[b]`` of k_new, v_new [B, C, Hkv, hd] written at slots
    ``start[b] + i`` through page_table [B, P] into the pools [n_pages, page_size, Hkv, hd]
    (:func:`tml.kernels.paged_write`, which drops padding rows and slots past the P pages).

    Page-table entries equal to :data:`RESERVED_PAGE` (not allocated to the session) are
    mapped to the out-of-range page ``n_pages`` first, so a row aimed at them is dropped
    too: a write can never land outside the session's own pages."""
    table = jnp.where(page_table == RESERVED_PAGE, k_pages.shape[0], page_table)
    return kernels.paged_write(k_pages, v_pages, table, k_new, v_new, start, n_new)


class PagedAttentionMask(NamedTuple):
    """Which keys a chunk's queries see in a paged cache. page_table int32 [B, P];
    q_positions [B, C] the KV slot of each query (padding queries sit on the last real
    one, so they widen no split range); kv_lengths [B] valid slots after the chunk."""

    page_table: jax.Array
    q_positions: jax.Array
    kv_lengths: jax.Array

    def attend(self, q, k_pages, v_pages, window):
        """:func:`tml.kernels.paged_attention`: visits only the splits holding visible
        keys; the bits of :func:`tml.kernels.attention` on the contiguous keys."""
        return kernels.paged_attention(q, k_pages, v_pages, self.page_table, q_positions=self.q_positions,
                                       kv_lengths=self.kv_lengths, sliding_window=window)


class PagedLayerKV(NamedTuple):
    """One layer of a :class:`PagedKVCache`: k, v [n_pages, page_size, Hkv, hd] pools;
    page_table [B, P]; start [B] first free slot; n_new [B] real rows of the chunk."""

    k: jax.Array
    v: jax.Array
    page_table: jax.Array
    start: jax.Array
    n_new: jax.Array

    def write(self, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
        """k_new, v_new [B, C, Hkv, hd] → this layer's pools with the chunk's real rows
        written (:func:`paged_write`; padding written nowhere)."""
        return paged_write(self.k, self.v, self.page_table, k_new, v_new, self.start, self.n_new)


class PagedKVCache(NamedTuple):
    """Keys and values of all sessions in one pool per layer, owned by the sampler.

    k, v: tuples of n_layers pools, each [n_pages, page_size, Hkv, hd] (one array per
    layer, so a layer's write scatters into its own donated buffer in place: no slice
    of a stacked pool, no restack, nothing that copies the pool per call); page_table:
    int32 [B, P] the pages of each row's session (unused entries
    :data:`RESERVED_PAGE`); lengths: int32 [B] valid slots per row. Which pages a
    session owns is decided outside (:class:`tml.sampler.pages.PagePool`);
    ``page_size`` must be a multiple of the attention split size so a key's split
    depends on its logical slot only.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    page_table: jax.Array
    lengths: jax.Array

    @classmethod
    def empty_pool(cls, cfg: ModelConfig, n_pages: int, page_size: int,
                   dtype=jnp.float32) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """Zeroed pools k, v: n_layers arrays [n_pages, page_size, Hkv, hd] each (zeros: finite)."""
        shape = (n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
        return (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)))

    @property
    def capacity(self) -> int:
        """Slots one row can address: P * page_size."""
        return self.page_table.shape[1] * self.k[0].shape[1]

    def attention_mask(self, n_new: jax.Array, chunk: int) -> PagedAttentionMask:
        i = jnp.arange(chunk, dtype=jnp.int32)[None]
        q_positions = self.lengths[:, None] + jnp.minimum(i, jnp.maximum(n_new[:, None] - 1, 0))
        return PagedAttentionMask(self.page_table, q_positions, self.lengths + n_new)

    def layer(self, i: int, n_new: jax.Array) -> PagedLayerKV:
        return PagedLayerKV(self.k[i], self.v[i], self.page_table, self.lengths, n_new)

    def appended(self, ks: list[jax.Array], vs: list[jax.Array], n_new: jax.Array) -> "PagedKVCache":
        """The cache after a chunk: every layer's written pools (kept one per layer) and
        lengths grown by n_new."""
        return PagedKVCache(tuple(ks), tuple(vs), self.page_table, self.lengths + n_new)
