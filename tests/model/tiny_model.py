"""The tiny test model and packed batches of it, shared by tests/model (its conftest.py
turns them into session fixtures) and tests/parallel."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.stream.random_turns import random_turns
from tml.model.config import ModelConfig
from tml.model.model import InteractionModel
from tml.stream import layout, pack

CFG = ModelConfig(name="test", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                  sliding_window=40, sliding_every=2, n_experts=4, n_shared_experts=1, top_k=2,
                  d_expert=64, n_dense_layers=1, vision_layers=2)
ROW, PATCHES, ALIGN = 256, 8, 64


def make_batch(seed: int, n_convs: int = 6, turns: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    rows = pack([layout(random_turns(rng, turns)) for _ in range(n_convs)], ROW, PATCHES, align=ALIGN)
    return {k: jnp.asarray(v) for k, v in rows.as_dict().items()}


def tiny_model() -> InteractionModel:
    return InteractionModel(CFG, rngs=nnx.Rngs(0))
