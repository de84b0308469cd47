"""Input front ends co-trained with the backbone: the dMel embedding and the hMLP.

Both follow the Inkling reference (``transformers.models.inkling``) so that weights can
be copied across (``tests/model/test_frontend_parity.py``):

* :class:`DMelEmbedding` — one table of ``n_bins`` rows per mel channel (channel *c*
  uses rows ``c * n_bins ...``), the 80 channel embeddings **summed**, then RMSNorm. The
  lookup-and-sum is computed as ``one_hot(bins) @ table`` through the kernel matmul: the
  same sum, in a fixed (batch-invariant) order, and its gradient is a matmul too (no
  scatter-add), ~25x faster on CPU than gathering 80 rows per frame.
* :class:`HMLPEncoder` — 40×40×2 patches folded time/space-into-depth layer by layer
  (Linear without bias → RMSNorm → GELU; the last layer projects to ``d_model``), then a
  final RMSNorm. Per-layer grids come from :func:`plan_out_scales`, Inkling's plan.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from scipy.optimize import linear_sum_assignment

from tml import kernels
from tml.model.layers import Linear, RMSNorm


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n % 2 == 0:
        out.append(2)
        n //= 2
    p = 3
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 2
    if n > 1:
        out.append(n)
    return out


def plan_out_scales(temporal_patch_size: int, patch_size: int, n_layers: int, n_channels: int) -> np.ndarray:
    """The (t, h, w, c) grid after each hMLP layer: int64 [n_layers + 1, 4].

    Spatial folds first (largest prime factor first), then temporal; channel counts are
    rounded up to multiples of 64; layers are matched to the scales whose size reduction
    is closest (in log space) to an even progression, as Inkling plans them.
    """
    h = np.cumprod(prime_factors(patch_size)[::-1])
    t = np.cumprod(prime_factors(temporal_patch_size)[::-1])
    h_ch = np.ceil((h**2 * n_channels / 64).astype(np.float32)).astype(np.int64) * 64
    t_ch = np.ceil(np.float32(h[-1] ** 2 * n_channels) * t.astype(np.float32)).astype(np.int64) * 64
    base = np.array([[1, 1, 1, n_channels]])
    spatial = np.stack([np.ones_like(h), h, h, h_ch], axis=1)
    temporal = np.stack([t, np.full_like(t, h[-1]), np.full_like(t, h[-1]), t_ch], axis=1)
    scales = np.concatenate([base, spatial, temporal]).astype(np.int64)
    reduction = np.prod(scales[:, :-1], axis=1).astype(np.float32)
    total = patch_size * patch_size * temporal_patch_size * n_channels
    ideal = np.linspace(0, np.log(np.float32(total)), n_layers + 1, dtype=np.float32)
    cost = np.abs(ideal[:, None] - np.log(reduction)[None, :])
    if n_layers >= len(scales):
        idx = np.argmin(cost, axis=1)
    else:
        idx = linear_sum_assignment(cost)[1]
    idx[0], idx[-1] = 0, len(scales) - 1
    return scales[idx]


class DMelEmbedding(nnx.Module):
    """uint8/int [..., n_mels] dMel bins → float [..., d_model]."""

    def __init__(self, n_mels: int, n_bins: int, d_model: int, *, eps: float, rngs: nnx.Rngs,
                 init_std: float = 0.02, param_dtype=jnp.float32):
        self.n_mels, self.n_bins = n_mels, n_bins
        self.table = nnx.Param(
            init_std * jax.random.normal(rngs.params(), (n_mels * n_bins, d_model), param_dtype),
            logical_axes=("mel_vocab", "embed"),
        )
        self.norm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype)

    def __call__(self, bins: jax.Array) -> jax.Array:
        table = self.table[...]
        onehot = jax.nn.one_hot(bins.astype(jnp.int32), self.n_bins, dtype=table.dtype)
        onehot = onehot.reshape(*bins.shape[:-1], self.n_mels * self.n_bins)   # row c*n_bins+b
        return self.norm(kernels.linear(onehot, table))


class HMLPLayer(nnx.Module):
    def __init__(self, d_in: int, d_out: int, t_fold: int, hw_fold: int, add_norm: bool, *,
                 eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.t_fold, self.hw_fold, self.add_norm = t_fold, hw_fold, add_norm
        self.proj = Linear(d_in, d_out, ("patch_in", "patch_out"), rngs=rngs,
                           init_std=1 / math.sqrt(d_in), param_dtype=param_dtype)
        self.norm = RMSNorm(d_out, eps=eps, param_dtype=param_dtype) if add_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, T, H, W, C] → [N, T/t, H/hw, W/hw, D]."""
        if self.t_fold > 1 or self.hw_fold > 1:
            x = rearrange(x, "n (t a) (h b) (w c) d -> n t h w (a b c d)",
                          a=self.t_fold, b=self.hw_fold, c=self.hw_fold)
        x = self.proj(x)
        if self.add_norm:
            x = jax.nn.gelu(self.norm(x), approximate=False)
        return x


class HMLPEncoder(nnx.Module):
    """float [N, T, P, P, C] normalised patches → [N, d_model], one token per patch."""

    def __init__(self, d_model: int, *, n_layers: int, patch_size: int, temporal_patch_size: int,
                 n_channels: int, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.scales = plan_out_scales(temporal_patch_size, patch_size, n_layers, n_channels)
        layers = []
        for i, (a, b) in enumerate(zip(self.scales[:-1], self.scales[1:])):
            last = i == n_layers - 1
            mult = int((b[0] // a[0]) * (b[1] // a[1]) * (b[2] // a[2]))
            layers.append(HMLPLayer(int(a[3]) * mult, d_model if last else int(b[3]),
                                    int(b[0] // a[0]), int(b[1] // a[1]), add_norm=not last,
                                    eps=eps, rngs=rngs, param_dtype=param_dtype))
        self.layers = nnx.List(layers)
        self.final_norm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype)

    def __call__(self, patches: jax.Array) -> jax.Array:
        x = patches
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x).reshape(patches.shape[0], -1)
