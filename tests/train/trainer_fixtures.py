"""Shared by the trainer tests and their subprocess worker: a tiny co-trained model, a
tiny corpus, a recipe around them, and the final parameters of a run (from its
checkpoint)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from tml.config import DataConfig, LoaderConfig, TmlConfig
from tml.model.config import ModelConfig
from tml.model.model import InteractionModel
from tml.parallel import MeshConfig, ParallelConfig
from tml.train.checkpoint import CheckpointConfig, Checkpointer
from tml.train.metrics_log import LoggingConfig, WandbConfig
from tml.train.optim import OptimConfig
from tml.train.trainer import TrainerConfig

MODEL = ModelConfig(name="trainer-test", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                    d_ff=64, n_experts=4, n_shared_experts=1, top_k=2, d_expert=32, n_dense_layers=1,
                    vision_layers=2)
STEPS = 6


def build_corpus(out_dir, eval_conversations: int = 2) -> DataConfig:
    """12 train conversations in 4 shards, 2 held out (about 5 s)."""
    from tml.data_pipelines.build import build_corpus as build

    data = DataConfig(out_dir=str(out_dir), n_conversations=12, eval_conversations=eval_conversations,
                      conversations_per_shard=3, workers=1)
    build(data, progress=False)
    return data


def config(corpus: DataConfig, run_dir, steps: int = STEPS, *, mesh: dict | None = None, devices: int = 0,
           readers: int = 0, **train_kw) -> TmlConfig:
    return TmlConfig(
        model=MODEL,
        data=corpus,
        loader=LoaderConfig(row_length=256, max_patches_per_row=8, align=64, seed=0, readers=readers),
        train=TrainerConfig(**({"steps": steps, "batch_size": 2, "run_dir": str(run_dir), "eval_every": 0,
                                "measure_peak": False} | train_kw)),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, total_steps=STEPS),
        checkpoint=CheckpointConfig(dir="ckpt", save_every=3, keep_last=5, keep_best=0, async_save=True),
        logging=LoggingConfig(log_every=1, progress_bar=False, wandb=WandbConfig(mode="disabled")),
        parallel=ParallelConfig(mesh=MeshConfig(**(mesh or {})), devices=devices),
    )


def with_train(cfg: TmlConfig, **kw) -> TmlConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kw))


def final_params(cfg: TmlConfig) -> tuple[int, list[np.ndarray]]:
    """(step, every model leaf as numpy) of the run's latest checkpoint."""
    model = nnx.eval_shape(lambda: InteractionModel(cfg.model, rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    ck = Checkpointer(f"{cfg.train.run_dir}/ckpt", model_config=cfg.model)
    r = ck.restore(model={"params": params, "rest": rest})
    ck.close()
    leaves = [np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
              for x in jax.tree.leaves(r.model)]
    return r.step, leaves


def same_bits(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))
        for x, y in zip(a, b))
