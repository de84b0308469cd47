"""Structured configs of training (light: no JAX import, so ``import tml.config`` stays cheap).

Each class configures one module and is re-exported there: ``TrainerConfig``
(:mod:`tml.train.trainer`), ``OptimConfig`` (:mod:`tml.train.optim`), ``CheckpointConfig``
(:mod:`tml.train.checkpoint`), ``LoggingConfig`` / ``WandbConfig``
(:mod:`tml.train.metrics_log`), ``DistributedConfig`` (:mod:`tml.train.distributed`).
The recipes under ``recipes/`` are validated against them.

**One source per default**: the values here are those of the default recipe (``tml train``:
the ``tiny`` model on the embedded corpus, on a CPU). A recipe under ``recipes/`` holds only
what differs from them (``model/small.yaml``, ``experiment/small_gpu_pod.yaml`` ...);
``tml train --cfg job`` prints the composed result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

@dataclass
class TrainerConfig:
    """The training loop (``recipes/train/``)."""

    steps: int = 300
    batch_size: int = 4                # global rows per step
    micro_batches: int = 1             # canonical micro-batches (accumulation); a multiple of the DP degree
    seed: int = 0
    kernel_mode: str = "batch_invariant"
    run_dir: str = "runs/tiny"
    resume: bool = True
    eval_every: int = 100              # 0 = off; skipped (said once) when the corpus has no eval split
    eval_batches: int = 2
    loss_text: float = 1.0
    loss_speech: float = 1.0
    loss_control: float = 1.0
    measure_peak: bool = True          # measure the float32 matmul peak for MFU


DEFAULT_NO_DECAY_PATTERNS: tuple[str, ...] = (
    r"bias", r"scale", r".*norm.*",
    r"embed", r"embedding", r"embeddings", r".*_embed", r".*_embedding", r".*_emb",
    r"wte", r"wpe", r"table", r".*_table",
)


@dataclass
class OptimConfig:
    """AdamW + warm-up/cosine schedule + clipping (a Hydra structured config)."""

    lr: float = 3e-3               # peak learning rate, reached at the end of warm-up
    warmup_steps: int = 30         # linear ramp length (0 = start at the peak)
    total_steps: int = 0           # end of the cosine, floor held afterwards; 0 = the run's
    #                                length (train.steps), see resolved()
    min_lr_ratio: float = 0.1      # floor = lr * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1      # decoupled; applied only where decay_mask is True
    clip_norm: float = 1.0         # global-norm clipping threshold; <= 0 disables it
    no_decay_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_NO_DECAY_PATTERNS))

    def resolved(self, train_steps: int) -> "OptimConfig":
        """This config with ``total_steps`` fixed for a run of ``train_steps`` updates (the one
        place where ``total_steps: 0`` is resolved; the trainer calls it).

        ``0`` becomes ``train_steps``, so the cosine ends with the run. A run no longer than
        warm-up never reaches the cosine: its learning rates are the first ones of the ramp
        whatever ``total_steps`` is, and ``total_steps`` becomes ``warmup_steps + 1`` (the
        smallest valid schedule) instead of an invalid one. An explicit ``total_steps`` is kept.
        (Unresolved, ``0`` means no cosine: the peak is held after warm-up.)
        """
        if self.total_steps:
            return self
        return replace(self, total_steps=max(train_steps, self.warmup_steps + 1))


@dataclass
class CheckpointConfig:
    """Checkpoint policy (a Hydra structured config)."""

    dir: str = "checkpoints"        # relative paths are taken under the run directory
    save_every: int = 100           # the trainer saves every this many steps (and at the end)
    keep_last: int = 2              # most recent checkpoints kept (>= 1)
    keep_best: int = 1              # best checkpoints kept by best_metric (0 = off)
    best_metric: str = "eval_loss"
    best_mode: str = "min"          # "min" | "max"
    async_save: bool = True


@dataclass
class WandbConfig:
    """wandb settings (a Hydra structured config). Nothing leaves the machine unless
    ``mode: online``."""

    mode: str = "offline"              # offline | online | disabled
    project: str = "tml"
    entity: Optional[str] = None
    name: Optional[str] = None         # default: the run directory's name
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """Metrics logging (a Hydra structured config)."""

    log_every: int = 10                # the trainer logs every this many steps (and at evaluations)
    progress_bar: bool = True
    bar_metrics: list[str] = field(default_factory=lambda: ["loss", "lr", "tokens_per_s", "mfu"])
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DistributedConfig:
    """Multi-process start-up (a Hydra structured config)."""

    mode: str = "auto"                          # auto | explicit | slurm | tpu | off
    coordinator_address: Optional[str] = None   # "host:port" of process 0 (explicit)
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[list[int]] = None  # devices this process drives (default all)
    initialization_timeout: int = 300           # seconds to wait for all processes
