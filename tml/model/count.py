"""Parameter counts — total and active per token — without allocating (``nnx.eval_shape``)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from tml.model.config import ModelConfig


def abstract_model(cfg: ModelConfig):
    from tml.model.model import InteractionModel

    return nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> dict:
    """{'total', 'active', 'routed_expert', 'per_component'}; active = total minus the
    routed experts a token does not use (n_experts - top_k of each MoE layer)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    per: dict[str, int] = {}
    routed = 0
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        top = str(getattr(path[0], "key", path[0]))
        n = math.prod(var.shape)
        per[top] = per.get(top, 0) + n
        axes = var.get_metadata().get("logical_axes") or ()
        if len(axes) == 3 and axes[0] == "experts":  # routed expert weights [E, ., .]
            routed += n
    total = sum(per.values())
    moe_layers = cfg.resolved_mlp_types().count("moe")
    inactive = routed * (cfg.n_experts - cfg.top_k) // cfg.n_experts if moe_layers else 0
    return {"total": total, "active": total - inactive, "routed_expert": routed, "per_component": per}


def format_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
