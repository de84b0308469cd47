"""Model-agnostic training infrastructure: optimizer, checkpoints, metrics, multi-host start.

=====================  ==================================================================
:mod:`.optim`          AdamW + warm-up/cosine + clipping + weight-decay mask (``OptimConfig``)
:mod:`.checkpoint`     Orbax checkpoints: keep-last/best, resharding restore, config guard,
                       preemption handler (``CheckpointConfig``)
:mod:`.metrics_log`    JSONL + wandb (offline by default) + progress bar; matmul peak, MFU
                       (``LoggingConfig``)
:mod:`.distributed`    ``jax.distributed`` start-up: explicit, SLURM, TPU (``DistributedConfig``)
=====================  ==================================================================
"""

from tml.train.checkpoint import (
    CheckpointConfig,
    CheckpointConfigMismatchError,
    CheckpointError,
    Checkpointer,
    CheckpointSaveError,
    CheckpointStructureError,
    NoCheckpointError,
    PreemptionHandler,
    Restored,
    config_fingerprint,
    install_preemption_handler,
    with_shardings,
)
from tml.train.distributed import (
    DistributedConfig,
    DistributedInfo,
    DistributedPlan,
    init_distributed,
    plan_distributed,
)
from tml.train.metrics_log import (
    LoggingConfig,
    MetricsLogger,
    WandbConfig,
    measure_matmul_peak_flops,
    mfu,
    read_metrics,
)
from tml.train.optim import (
    OptimConfig,
    decay_mask,
    describe_decay,
    learning_rate_at,
    lr_schedule,
    make_optimizer,
)

__all__ = [
    "OptimConfig", "make_optimizer", "lr_schedule", "learning_rate_at", "decay_mask",
    "describe_decay",
    "Checkpointer", "CheckpointConfig", "Restored", "CheckpointError", "NoCheckpointError",
    "CheckpointSaveError", "CheckpointConfigMismatchError", "CheckpointStructureError",
    "config_fingerprint", "with_shardings", "install_preemption_handler", "PreemptionHandler",
    "MetricsLogger", "LoggingConfig", "WandbConfig", "read_metrics",
    "measure_matmul_peak_flops", "mfu",
    "DistributedConfig", "DistributedPlan", "DistributedInfo", "plan_distributed",
    "init_distributed",
]
