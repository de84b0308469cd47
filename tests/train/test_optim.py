"""tml.train.optim: schedule, decay mask, clipping, on toy NNX modules and pytrees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.train.train_toys import make_toy
from tml.train.optim import (
    OptimConfig, decay_mask, describe_decay, learning_rate_at, make_optimizer, should_decay,
)


def test_schedule_warmup_cosine_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = [learning_rate_at(cfg, t) for t in range(20)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)  # never 0
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.55, rel=1e-6)   # cosine midpoint = (peak + floor) / 2
    assert all(a >= b for a, b in zip(lrs[4:15], lrs[5:15]))
    assert lrs[14:] == pytest.approx([0.1] * 6)
    no_warmup = OptimConfig(lr=2.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    assert learning_rate_at(no_warmup, 0) == pytest.approx(2.0)
    assert learning_rate_at(no_warmup, 10) == pytest.approx(0.0, abs=1e-7)


def test_total_steps_zero_is_the_run_length():
    """``total_steps: 0`` (the default) resolves to ``train.steps``: the cosine ends with the
    run. A run inside warm-up gets the first learning rates of the same ramp."""
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    run = cfg.resolved(14)
    assert cfg.total_steps == 0 and run.total_steps == 14
    explicit = OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [learning_rate_at(run, t) for t in range(20)] == [learning_rate_at(explicit, t) for t in range(20)]
    assert OptimConfig(total_steps=50).resolved(14).total_steps == 50        # explicit wins
    short = OptimConfig(lr=1.0, warmup_steps=30).resolved(20)               # shorter than warm-up
    assert short.total_steps == 31
    long = OptimConfig(lr=1.0, warmup_steps=30, total_steps=300)
    assert [learning_rate_at(short, t) for t in range(20)] == [learning_rate_at(long, t) for t in range(20)]
    assert learning_rate_at(cfg, 100) == pytest.approx(1.0)                 # unresolved: no cosine


def test_logged_lr_is_the_applied_lr():
    """With b1 = b2 = 0, no clipping or decay, Adam's update of a gradient of 1 is
    -lr * 1 / (1 + eps): the parameter moves by the scheduled lr in every update."""
    cfg = OptimConfig(lr=0.1, warmup_steps=3, total_steps=8, min_lr_ratio=0.2, b1=0.0, b2=0.0,
                      eps=1e-12, weight_decay=0.0, clip_norm=0.0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros((2, 2))}
    state = tx.init(params)
    for t in range(10):
        updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
        np.testing.assert_allclose(-np.asarray(updates["w"]), learning_rate_at(cfg, t), rtol=1e-6)


MODEL_LIKE = {
    "token_embed": (300, 8), "modality_embed": (6, 8), "dmel": {"table": (1280, 8)},
    "norm": {"scale": (8,)},
    "blocks": [{"attn": {"wq": {"w": (8, 8)}, "q_norm": {"scale": (4,)}},
                "attn_norm": {"scale": (8,)}, "mlp": {"experts": (4, 8, 16), "router": (8, 4)}}],
    "hmlp": {"layers": [{"proj": {"w": (3200, 8)}}]},
    "text_head": {"w": (8, 300)}, "unembed": (8, 300), "l1": {"bias": (8,), "kernel": (4, 8)},
    "final_layer_norm": {"weight2d": (8, 8)},
}


def test_decay_mask_rules():
    params = jax.tree.map(lambda s: jnp.zeros(s), MODEL_LIKE, is_leaf=lambda x: isinstance(x, tuple))
    assert describe_decay(params) == {
        "blocks/0/attn/q_norm/scale": False, "blocks/0/attn/wq/w": True,
        "blocks/0/attn_norm/scale": False, "blocks/0/mlp/experts": True,
        "blocks/0/mlp/router": True, "dmel/table": False, "final_layer_norm/weight2d": False,
        "hmlp/layers/0/proj/w": True, "l1/bias": False, "l1/kernel": True,
        "modality_embed": False, "norm/scale": False, "text_head/w": True,
        "token_embed": False, "unembed": True,
    }
    assert should_decay("a/b", 2, no_decay_patterns=["b"]) is False
    assert should_decay("a/B", 2, no_decay_patterns=["b"]) is False  # case-insensitive
    assert should_decay("a/bb", 2, no_decay_patterns=["b"]) is True   # whole-name match


def test_weight_decay_applies_only_to_masked_params_of_an_nnx_model():
    """Zero gradients: Adam's direction is 0, so only decoupled decay moves parameters —
    the 2-D kernels shrink by exactly lr * wd; biases, norm scale, embedding are untouched
    (bitwise)."""
    cfg = OptimConfig(lr=0.5, warmup_steps=0, total_steps=10, min_lr_ratio=1.0,
                      weight_decay=0.1, clip_norm=0.0)
    model, opt = make_toy(0, cfg)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    opt.update(model, zeros)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
    for name in ("l1", "l2"):
        np.testing.assert_allclose(after[name]["kernel"], before[name]["kernel"] * (1 - 0.05),
                                   rtol=1e-6)
        assert np.array_equal(after[name]["bias"], before[name]["bias"])
    assert np.array_equal(after["norm"]["scale"], before["norm"]["scale"])
    assert np.array_equal(after["tok_embed"]["embedding"], before["tok_embed"]["embedding"])
    mask = decay_mask(nnx.state(model, nnx.Param))
    assert sorted(describe_decay(mask).keys()) == sorted(describe_decay(zeros).keys())


def test_global_norm_clipping_happens_before_adam():
    """Adam's first moment after one update is (1 - b1) * clipped gradient."""
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, b1=0.9, clip_norm=1.0)
    tx = make_optimizer(cfg)
    params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,))}
    grads = {"a": jnp.full((3, 4), 100.0), "b": jnp.full((5,), -50.0)}
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    norm = float(optax.global_norm(grads))
    mu = state[1][0].mu  # chain(clip, adamw(...)) -> adamw's ScaleByAdamState
    np.testing.assert_allclose(mu["a"], 0.1 * 100.0 / norm, rtol=1e-5)
    np.testing.assert_allclose(mu["b"], 0.1 * -50.0 / norm, rtol=1e-5)
    unclipped = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, clip_norm=0.0))
    _, s2 = unclipped.update(grads, unclipped.init(params), params)
    np.testing.assert_allclose(s2[0][0].mu["a"], 10.0, rtol=1e-6)  # no clip: 0.1 * 100


def test_invalid_configs_name_the_field():
    with pytest.raises(ValueError, match=r"optim.total_steps \(10\) must be > optim.warmup_steps \(10\)"):
        make_optimizer(OptimConfig(warmup_steps=10, total_steps=10))
    with pytest.raises(ValueError, match="optim.min_lr_ratio"):
        make_optimizer(OptimConfig(min_lr_ratio=1.5))
    with pytest.raises(ValueError, match="optim.lr must be > 0"):
        learning_rate_at(OptimConfig(lr=0.0), 0)


def test_toy_training_loss_falls():
    from tests.train.train_toys import toy_batch, train_step

    model, opt = make_toy(0)
    key = jax.random.key(0)
    losses = []
    for _ in range(60):
        key, sub = jax.random.split(key)
        losses.append(float(train_step(model, opt, *toy_batch(sub, batch=32))))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
