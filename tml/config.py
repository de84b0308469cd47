"""Structured configs: the schema every recipe under ``recipes/`` is validated against.

Hydra merges the YAML recipes and the command-line overrides onto these dataclasses, so
an unknown key (a typo) or a value of the wrong type fails at start-up with the full key
named, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from tml.model.config import ModelConfig
from tml.parallel.config import ParallelConfig
from tml.train.config import CheckpointConfig, DistributedConfig, LoggingConfig, OptimConfig, TrainerConfig


@dataclass
class DataConfig:
    """Where conversations come from and where their shards go (``recipes/data/``)."""

    source: str = "synthetic"          # "synthetic" (embedded corpus) | "moshi" (ingest)
    out_dir: str = "data/synthetic"    # shards, manifest.json, rejects.jsonl
    # synthetic corpus
    n_conversations: int = 256
    eval_conversations: int = 32       # held-out split, separate shards
    seed: int = 0
    scenarios: list[str] = field(default_factory=list)  # empty = all scenarios
    # ingestion of a moshi-finetune style corpus
    manifest: Optional[str] = None     # the .jsonl manifest
    video_dir: Optional[str] = None    # optional <stem>.npy video per conversation
    assistant_channel: int = 0         # channel of the model's own voice
    # shard writing
    conversations_per_shard: int = 16
    workers: int = 2


@dataclass
class LoaderConfig:
    """Shards → packed batches (``recipes/loader/``)."""

    split: str = "train"
    row_length: int = 1024
    max_patches_per_row: int = 64
    batch_size: int = 4
    align: int = 1                     # segment starts on multiples of this (attention split size)
    seed: int = 0
    shuffle: bool = True
    workers: int = 0                   # torch DataLoader workers; 0 = in-process
    readers: int = 0                   # canonical readers of the global batch (tml.train.global_batch);
    #                                    0 = one per process. Fix it to resume on another process count.


@dataclass
class BenchConfig:
    out: str = "bench_results/data.json"
    conversations: int = 64
    loader_batches: int = 120
    model_tokens_per_second: float = 0.0  # tiny model's training consumption; 0 = not known yet


@dataclass
class ClusterConfig:
    """Where ``tml train`` runs (``recipes/cluster/``), recorded with the run's config.

    Informational only: the launcher's own settings (nodes, tasks per node, GPUs, time
    limit) live under ``hydra.launcher``, and how processes find each other under
    ``distributed`` (auto-detected on SLURM and TPU VMs).
    """

    name: str = "local"                # the recipe: local | submitit_local | slurm | tpu_pod
    launcher: str = "basic"            # the Hydra launcher it selects


@dataclass
class TmlConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="tml_schema", node=TmlConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="loader", name="loader_schema", node=LoaderConfig)
    cs.store(group="train", name="train_schema", node=TrainerConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
