"""A tiny model and packed batches shared by the model tests (compiled once)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stream_fixtures import random_turns
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


@pytest.fixture(scope="session")
def model():
    return InteractionModel(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def forward():
    return nnx.jit(lambda m, b: m(b))


@pytest.fixture(scope="session")
def append_chunk():
    """Jitted ``model(chunk, cache=cache, n_new=n)``: the chunk's Outputs, with the new cache."""
    return nnx.jit(lambda m, c, cache, n: m(c, cache=cache, n_new=n))
