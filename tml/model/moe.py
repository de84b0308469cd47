"""Mixture-of-experts feed-forward: sigmoid router with a score-correction bias,
top-k routed SwiGLU experts plus always-on shared experts, dropless.

Routing and expert compute go through :mod:`tml.kernels` (``route_topk``, ``moe_ffn``),
so a token's output never depends on the other tokens in the batch. The correction bias
only shifts which experts are *selected*; it is not trained by gradients but moved
toward under-used experts by :func:`update_balance_bias` (auxiliary-loss-free balancing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tml import kernels
from tml.model.config import ModelConfig
from tml.model.layers import Linear, SwiGLU, normal
from tml.parallel.expert import bound_expert_parallel, moe_ffn


class RouterBias(nnx.Variable):
    """Score-correction bias [E]: state, not a parameter (no gradient, no weight decay)."""


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        E, d, f = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.n_experts, self.top_k, self.route_scale = E, cfg.top_k, cfg.route_scale
        self.router = Linear(d, E, ("embed", "experts"), rngs=rngs, init_std=cfg.init_std,
                             param_dtype=param_dtype)
        self.bias = RouterBias(jnp.zeros((E,), jnp.float32))
        std = cfg.init_std
        self.w_gate = nnx.Param(normal(rngs, (E, d, f), std, param_dtype), logical_axes=("experts", "embed", "expert_mlp"))
        self.w_up = nnx.Param(normal(rngs, (E, d, f), std, param_dtype), logical_axes=("experts", "embed", "expert_mlp"))
        self.w_down = nnx.Param(normal(rngs, (E, f, d), std, param_dtype), logical_axes=("experts", "expert_mlp", "embed"))
        self.shared = (SwiGLU(d, cfg.n_shared_experts * f, rngs=rngs, init_std=std, param_dtype=param_dtype)
                       if cfg.n_shared_experts else None)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, d] → weights [N, k] (scaled), experts [N, k]."""
        logits = kernels.linear(x.astype(jnp.float32), self.router.w[...].astype(jnp.float32))
        w, e = kernels.route_topk(logits, self.top_k, score_fn="sigmoid", correction_bias=self.bias[...])
        return w * self.route_scale, e

    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, d], valid [B, T] → (y [B, T, d], load [E]: fraction of the valid
        tokens' routed slots that went to each expert)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = self.route(flat)
        dt = x.dtype
        # kernels.moe_ffn; all-to-all over the mesh inside tml.parallel.expert_parallel(); else the
        # expert width is row-parallel over the mesh axis tml.parallel.tensor_parallel() binds
        # "expert_mlp" to (the down projection's canonical chunks, one fixed tree at every TP degree)
        ffn = moe_ffn if bound_expert_parallel() is not None else functools.partial(kernels.moe_ffn, axis="expert_mlp")
        y = ffn(flat, experts, weights.astype(dt), self.w_gate[...].astype(dt),
                self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        if self.shared is not None:
            y = y + self.shared(flat)
        hits = jax.nn.one_hot(experts, self.n_experts, dtype=jnp.float32).sum(1)   # [N, E]
        v = valid.reshape(-1, 1).astype(jnp.float32)
        load = (hits * v).sum(0) / jnp.maximum(v.sum() * self.top_k, 1.0)
        return y.reshape(shape), load


def update_balance_bias(model: nnx.Module, expert_load: jax.Array, rate: float) -> None:
    """Move every MoE layer's correction bias toward its under-used experts:
    ``bias += rate * sign(mean_load - load)`` with expert_load [n_moe_layers, E]."""
    layers = [m for _, m in model.iter_modules() if isinstance(m, MoE)]
    for layer, load in zip(layers, expert_load):
        layer.bias[...] = layer.bias[...] + rate * jnp.sign(load.mean() - load)
