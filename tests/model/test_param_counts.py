"""`tml model params`: every recipe counts without allocating; the paper-scale config is
within 3% of TML-Interaction-Small's reported 276B total / 12B active parameters."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tml.model.config import ModelConfig
from tml.model.count import count_params

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "model"


def load(name: str) -> ModelConfig:
    raw = OmegaConf.load(RECIPES / f"{name}.yaml")
    raw.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def test_tiny_counts_match_the_allocated_model():
    import jax
    from flax import nnx

    from tml.model.model import InteractionModel

    cfg = load("tiny")
    real = sum(x.size for x in jax.tree.leaves(nnx.state(InteractionModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    c = count_params(cfg)
    assert c["total"] == real
    moe_layers = cfg.resolved_mlp_types().count("moe")
    per_expert = 3 * cfg.d_model * cfg.d_expert
    assert c["routed_expert"] == moe_layers * cfg.n_experts * per_expert
    assert c["total"] - c["active"] == moe_layers * (cfg.n_experts - cfg.top_k) * per_expert


@pytest.mark.slow
def test_paper_scale_config_is_within_three_percent():
    c = count_params(load("tml_interaction_small"))
    assert abs(c["total"] / 276e9 - 1) < 0.03, c["total"]
    assert abs(c["active"] / 12e9 - 1) < 0.03, c["active"]
