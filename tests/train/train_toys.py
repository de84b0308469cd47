"""Tiny NNX modules and a toy training loop shared by the tests of ``tml.train``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tml.train.optim import OptimConfig, make_optimizer


class ToyMLP(nnx.Module):
    """x [B, d_in] → Linear → RMSNorm → GELU → Dropout → Linear → [B, d_out]; plus a token
    table. The dropout keeps an RNG stream (typed key + counter) in the model's state, which
    a bitwise resume must restore too."""

    def __init__(self, d_in: int = 4, d_hidden: int = 16, d_out: int = 2, vocab: int = 10,
                 *, rngs: nnx.Rngs):
        self.tok_embed = nnx.Embed(vocab, d_in, rngs=rngs)
        self.l1 = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.norm = nnx.RMSNorm(d_hidden, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.l2 = nnx.Linear(d_hidden, d_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(self.drop(jax.nn.gelu(self.norm(self.l1(x)))))


TOY_CONFIG = {"d_in": 4, "d_hidden": 16, "d_out": 2, "vocab": 10}


def make_toy(seed: int = 0, cfg: OptimConfig | None = None, **sizes):
    """(model, nnx.Optimizer) for a ToyMLP."""
    model = ToyMLP(**{**TOY_CONFIG, **sizes}, rngs=nnx.Rngs(seed, dropout=seed + 1))
    cfg = cfg or OptimConfig(lr=1e-2, warmup_steps=2, total_steps=100, weight_decay=0.1)
    return model, nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)


def toy_batch(key: jax.Array, batch: int = 8, d_in: int = 4):
    kx, _ = jax.random.split(key)
    x = jax.random.normal(kx, (batch, d_in))
    y = jnp.stack([x.sum(-1), x[:, 0] - x[:, 1]], -1)
    return x, y


@nnx.jit
def train_step(model: ToyMLP, opt: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2) + 1e-3 * jnp.mean(m.tok_embed.embedding[...] ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


def run_steps(model, opt, key: jax.Array, n: int) -> jax.Array:
    """n training steps; returns the advanced key."""
    for _ in range(n):
        key, sub = jax.random.split(key)
        train_step(model, opt, *toy_batch(sub))
    return key


def bits(tree) -> list[np.ndarray]:
    """Leaves as raw uint32/uint8 bits, for bitwise comparisons."""
    out = []
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.asarray(leaf)
        out.append(a.view(np.uint32) if a.dtype.itemsize == 4 else a.view(np.uint8))
    return out


def assert_bitwise_equal(a, b) -> None:
    la, lb = bits(a), bits(b)
    assert len(la) == len(lb) and len(la) > 0
    for x, y in zip(la, lb):
        assert x.shape == y.shape and np.array_equal(x, y)
