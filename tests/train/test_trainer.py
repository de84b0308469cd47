"""The trainer end to end on a tiny corpus: losses fall, runs are deterministic, and
resuming from a checkpoint continues bitwise identically (raw bits of every parameter)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from tml.config import DataConfig, LoaderConfig, TmlConfig
from tml.model.config import ModelConfig
from tml.model.model import InteractionModel
from tml.train.checkpoint import CheckpointConfig, Checkpointer
from tml.train.metrics_log import LoggingConfig, WandbConfig, read_metrics
from tml.train.optim import OptimConfig
from tml.train.trainer import TrainerConfig, train

MODEL = ModelConfig(name="trainer-test", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                    d_ff=64, n_experts=4, n_shared_experts=1, top_k=2, d_expert=32, n_dense_layers=1,
                    vision_layers=2)
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical programs across the runs below compile once."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tml.data_pipelines.build import build_corpus

    data = DataConfig(out_dir=str(tmp_path_factory.mktemp("corpus")), n_conversations=12,
                      eval_conversations=2, conversations_per_shard=3, workers=1)
    build_corpus(data, progress=False)
    return data


def config(corpus, run_dir, steps=STEPS, **train_kw) -> TmlConfig:
    return TmlConfig(
        model=MODEL,
        data=corpus,
        loader=LoaderConfig(row_length=256, max_patches_per_row=8, align=64, seed=0),
        train=TrainerConfig(**({"steps": steps, "batch_size": 2, "run_dir": str(run_dir), "eval_every": 0,
                                "measure_peak": False} | train_kw)),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, total_steps=STEPS),
        checkpoint=CheckpointConfig(dir="ckpt", save_every=3, keep_last=5, keep_best=0, async_save=True),
        logging=LoggingConfig(progress_bar=False, wandb=WandbConfig(mode="disabled")),
    )


def final_params(cfg: TmlConfig):
    model = nnx.eval_shape(lambda: InteractionModel(cfg.model, rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    ck = Checkpointer(f"{cfg.train.run_dir}/ckpt", model_config=cfg.model)
    r = ck.restore(model={"params": params, "rest": rest})
    ck.close()
    return r.step, jax.tree.leaves(r.model)


def same_bits(a, b):
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    cfg = config(corpus, tmp_path_factory.mktemp("straight"))
    summary = train(cfg)
    return cfg, summary


def test_losses_fall_and_metrics_are_logged(straight):
    cfg, summary = straight
    assert summary["steps"] == STEPS
    assert summary["last_loss"] < summary["first_loss"]
    rows = read_metrics(cfg.train.run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss_text", "loss_speech", "loss_control", "grad_norm", "lr", "tokens_per_s"):
        assert all(r[key] is not None for r in rows), key


def test_same_recipe_and_seed_give_identical_parameters(straight, corpus, tmp_path):
    cfg, _ = straight
    again = config(corpus, tmp_path / "again")
    train(again)
    step_a, a = final_params(cfg)
    step_b, b = final_params(again)
    assert step_a == step_b == STEPS and same_bits(a, b)


def test_resume_continues_bitwise_identically(straight, corpus, tmp_path):
    cfg, _ = straight
    half = config(corpus, tmp_path / "resumed", steps=STEPS // 2)
    train(half)
    resumed = dataclasses.replace(half, train=dataclasses.replace(half.train, steps=STEPS))
    summary = train(resumed)
    assert summary["steps"] == STEPS
    _, a = final_params(cfg)
    _, b = final_params(resumed)
    assert same_bits(a, b)


def test_a_different_seed_gives_different_parameters(straight, corpus, tmp_path):
    cfg, _ = straight
    other = config(corpus, tmp_path / "seed1", steps=1, seed=1)
    train(other)
    straight1 = config(corpus, tmp_path / "seed0", steps=1)
    train(straight1)
    assert not same_bits(final_params(other)[1], final_params(straight1)[1])
