"""Model-agnostic training infrastructure: optimizer, checkpoints, metrics, multi-host start.

=====================  ==================================================================
:mod:`.optim`          AdamW + warm-up/cosine + clipping + weight-decay mask (``OptimConfig``)
:mod:`.checkpoint`     Orbax checkpoints: keep-last/best, resharding restore, config guard,
                       preemption handler (``CheckpointConfig``)
:mod:`.metrics_log`    JSONL + wandb (offline by default) + progress bar; matmul peak, MFU
                       (``LoggingConfig``)
:mod:`.distributed`    ``jax.distributed`` start-up: explicit, SLURM, TPU (``DistributedConfig``)
:mod:`.state`          ``TrainState`` (params, rest, opt_state, rng, step) and ``StepOutput``
=====================  ==================================================================

Configs come from :mod:`tml.train.config` (no JAX); the rest is imported on first use, so
``import tml.train.config`` (and ``import tml.config``) never starts JAX.
"""

from tml.train.config import (
    CheckpointConfig,
    DistributedConfig,
    LoggingConfig,
    OptimConfig,
    TrainerConfig,
    WandbConfig,
)

_LAZY = {
    "Checkpointer": "tml.train.checkpoint",
    "Restored": "tml.train.checkpoint",
    "CheckpointError": "tml.train.checkpoint",
    "NoCheckpointError": "tml.train.checkpoint",
    "CheckpointSaveError": "tml.train.checkpoint",
    "CheckpointConfigMismatchError": "tml.train.checkpoint",
    "CheckpointStructureError": "tml.train.checkpoint",
    "config_fingerprint": "tml.train.checkpoint",
    "with_shardings": "tml.train.checkpoint",
    "install_preemption_handler": "tml.train.preemption",
    "PreemptionHandler": "tml.train.preemption",
    "TrainState": "tml.train.state",
    "StepOutput": "tml.train.state",
    "DistributedPlan": "tml.train.distributed",
    "DistributedInfo": "tml.train.distributed",
    "plan_distributed": "tml.train.distributed",
    "init_distributed": "tml.train.distributed",
    "MetricsLogger": "tml.train.metrics_log",
    "read_metrics": "tml.train.metrics_log",
    "measure_matmul_peak_flops": "tml.train.metrics_log",
    "mfu": "tml.train.metrics_log",
    "make_optimizer": "tml.train.optim",
    "lr_schedule": "tml.train.optim",
    "learning_rate_at": "tml.train.optim",
    "decay_mask": "tml.train.optim",
    "describe_decay": "tml.train.optim",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["CheckpointConfig", "DistributedConfig", "LoggingConfig", "OptimConfig", "TrainerConfig",
           "WandbConfig", *_LAZY]
