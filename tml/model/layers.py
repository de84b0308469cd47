"""Building blocks. Every matmul, norm, softmax and attention goes through
:mod:`tml.kernels`, so ``kernel_mode("standard")`` / ``"batch_invariant"`` flips the whole
model. Parameters carry ``logical_axes`` metadata (mapped to mesh axes from outside,
``tml.parallel``); the model never names a mesh axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tml import kernels
from tml.model.config import ModelConfig


def normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
    """``x [..., d_in] @ w [d_in, d_out]`` through the kernel API (no bias).

    ``row_parallel=True`` (attention ``wo``, the MLP ``down``): the contraction ``d_in``,
    logical axis ``axes[0]``, is the one tensor parallelism splits, so it goes through
    :func:`tml.kernels.row_parallel_linear` — canonical chunks summed in one fixed tree at
    every TP degree, 1 included; ``tml.parallel.tensor_parallel`` decides which mesh axis
    (if any) splits it.
    """

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs,
                 init_std: float = 0.02, param_dtype=jnp.float32, row_parallel: bool = False):
        self.w = nnx.Param(normal(rngs, (d_in, d_out), init_std, param_dtype), logical_axes=axes)
        self.row_parallel_axis = axes[0] if row_parallel else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.w[...].astype(x.dtype)
        if self.row_parallel_axis is not None:
            return kernels.row_parallel_linear(x, w, axis=self.row_parallel_axis)
        return kernels.linear(x, w)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return kernels.rms_norm(x, self.scale[...], eps=self.eps)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (half-split pairs). x [B, T, H, D], positions [B, T] → x."""
    half = x.shape[-1] // 2
    inv = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1]))
    ang = positions.astype(jnp.float32)[..., None, None] * inv          # [B, T, 1, half]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class AttentionMask(NamedTuple):
    """Which keys each query sees: the masking keywords of :func:`tml.kernels.attention`
    (meaning and shapes in ``kernels/split_kv_attention.py``), built by ``for_rows`` or
    ``for_cache``. A ``None`` field takes the kernel's default.

    q_positions [B, Tq] KV slot of each query; q_segment_ids [B, Tq];
    kv_segment_ids [B, Tk]; kv_lengths [B] valid KV slots.
    """

    q_positions: jax.Array | None
    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array
    kv_lengths: jax.Array | None

    @classmethod
    def for_rows(cls, segment_ids: jax.Array) -> "AttentionMask":
        """Packed rows [B, L] attending to themselves: query t sits at slot t and every
        slot is valid (the kernel defaults, so the training program is unchanged);
        segments never see each other."""
        return cls(None, segment_ids, segment_ids, None)

    @classmethod
    def for_cache(cls, lengths: jax.Array, n_new: jax.Array, chunk: int, capacity: int) -> "AttentionMask":
        """A chunk of ``chunk`` queries per session written at slots ``[lengths,
        lengths + chunk)`` of a cache of ``capacity`` slots, of which ``n_new`` [B] are
        real: keys at slots ``>= lengths + n_new`` (the chunk's padding, older garbage)
        are invisible. One segment per session."""
        B = lengths.shape[0]
        slots = lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None]
        return cls(slots, jnp.ones((B, chunk), jnp.int32), jnp.ones((B, capacity), jnp.int32), lengths + n_new)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, window: int | None) -> jax.Array:
        """:func:`tml.kernels.attention` of q [B, Tq, Hq, hd] over k, v [B, Tk, Hkv, hd]
        with this mask (a paged cache's mask, :class:`tml.model.kv_cache.PagedAttentionMask`,
        has the same method over its pages)."""
        return kernels.attention(q, k, v, sliding_window=window, **self._asdict())


class Attention(nnx.Module):
    """Grouped-query attention with per-head q/k RMSNorm and rotary positions."""

    def __init__(self, cfg: ModelConfig, sliding: bool, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.theta = h, kv, hd, cfg.rope_theta
        self.window = cfg.sliding_window if sliding else None
        self.sliding_window = cfg.sliding_window
        kw = dict(rngs=rngs, init_std=cfg.init_std, param_dtype=param_dtype)
        self.wq = Linear(d, h * hd, ("embed", "q_heads"), **kw)
        self.wk = Linear(d, kv * hd, ("embed", "kv_heads"), **kw)
        self.wv = Linear(d, kv * hd, ("embed", "kv_heads"), **kw)
        self.wo = Linear(h * hd, d, ("q_heads", "embed"), row_parallel=True, **kw)
        self.q_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(hd, eps=cfg.norm_eps, param_dtype=param_dtype)

    def project_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, d], positions [B, T] (RoPE) → k, v [B, T, Hkv, hd] (k normed and rotated)."""
        B, T, _ = x.shape
        k = self.k_norm(self.wk(x).reshape(B, T, self.n_kv, self.head_dim))
        v = self.wv(x).reshape(B, T, self.n_kv, self.head_dim)
        return rotary(k, positions, self.theta), v

    def __call__(self, x: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array,
                 mask: AttentionMask, sliding: jax.Array | None = None) -> jax.Array:
        """x [B, T, d] queries at RoPE positions [B, T]; k, v the keys they may see (the
        row itself or a cache: [B, Tk, Hkv, hd], or a paged cache's pools), ``mask`` which
        ones (and the attention call, ``mask.attend``) → [B, T, d].

        ``sliding`` (a traced bool, for a layer scan over sliding and full layers) chooses
        the window at run time, ``lax.cond`` between the two static attention programs;
        None: this layer's own window."""
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).reshape(B, T, self.n_heads, self.head_dim))
        q = rotary(q, positions, self.theta)
        if sliding is None:
            o = mask.attend(q, k, v, self.window)
        else:
            o = jax.lax.cond(sliding, lambda: mask.attend(q, k, v, self.sliding_window),
                             lambda: mask.attend(q, k, v, None))
        return self.wo(o.reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nnx.Module):
    def __init__(self, d: int, d_ff: int, *, rngs: nnx.Rngs, init_std: float, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, init_std=init_std, param_dtype=param_dtype)
        self.gate = Linear(d, d_ff, ("embed", "mlp"), **kw)
        self.up = Linear(d, d_ff, ("embed", "mlp"), **kw)
        self.down = Linear(d_ff, d, ("mlp", "embed"), row_parallel=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
