"""The sessions' keys and values between calls: :class:`KVCache` (all layers, owned by
the sampler) and :class:`LayerKV` (one layer's view, what a block reads and writes).

A chunk of C tokens is written at slots ``[length, length + C)`` of each session; the
slot is the attention kernel's key index, so the split a key falls in depends on its
logical position only (a paged cache must keep that: pages a multiple of the split
size). :meth:`LayerKV.write` is the one place keys are written.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tml.model.config import ModelConfig

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

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], self.lengths)

    def appended(self, ks: list[jax.Array], vs: list[jax.Array], n_new: jax.Array) -> "KVCache":
        """The cache after a chunk: every layer's written buffers (from
        :meth:`LayerKV.write`) and lengths grown by n_new [B]."""
        return KVCache(jnp.stack(ks), jnp.stack(vs), self.lengths + n_new)
