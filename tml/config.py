"""Structured configs: the schema every recipe under ``recipes/`` is validated against.

Hydra merges the YAML recipes and the command-line overrides onto these dataclasses, so
an unknown key (a typo) or a value of the wrong type fails at start-up with the full key
named, before any work starts.

**One source per default**: a dataclass field's default is the value of the default recipe
(``tml train``); a recipe holds only what differs from it. Where a run executes is not
part of this schema: the ``cluster/`` recipe group selects the Hydra launcher (and sets
``distributed``), and Hydra records the choice in the run's ``.hydra/hydra.yaml``
(``runtime.choices.cluster``).

No JAX here (``tests/test_cli_packaging.py`` checks it): composing a recipe is instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from tml.eval.config import EvalConfig
from tml.model.config import ModelConfig
from tml.parallel.config import ParallelConfig
from tml.rl.config import RLConfig
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
    row_length: int = 512
    max_patches_per_row: int = 32
    # Segments start on multiples of this: a multiple of the attention split size
    # (tml.kernels.SPLIT_SIZE = 64; a literal here to keep this module JAX-free, and
    # tests/data_pipelines/test_shards_loader.py asserts they agree), else packed scoring
    # is not bitwise equal to the sampler's and the loader refuses it. Rows per batch:
    # train.batch_size.
    align: int = 64
    seed: int = 0
    shuffle: bool = True
    workers: int = 0                   # torch DataLoader workers; 0 = in-process
    readers: int = 0                   # canonical readers of the global batch (tml.train.global_batch);
    #                                    0 = one per process. Fix it to resume on another process count.


@dataclass
class BenchConfig:
    """``tml data bench`` (corpus build and loader throughput)."""

    out: str = "bench_results/data.json"
    conversations: int = 64
    loader_batches: int = 120
    loader_batch_size: int = 8            # rows per batch of the loader benchmark
    model_tokens_per_second: float = 0.0  # tiny model's training consumption; 0 = not known yet


@dataclass
class DivergenceConfig:
    """``tml divergence``: the trainer–sampler divergence inspector
    (:mod:`tml.sampler.divergence_run`; metrics in :mod:`tml.sampler.divergence`)."""

    checkpoint: str = "runs/tiny"      # what `make run` writes (run dir, checkpoints/ or a step dir); none = fresh
    out: str = "runs/divergence"       # <out>/divergence.json, <out>/divergence_<mode>.png
    modes: list[str] = field(default_factory=lambda: ["batch_invariant", "standard"])
    sessions: int = 8                  # held-out scenario sessions (indices tml.eval.scenarios.HELD_OUT_INDEX_OFFSET + k)
    batch_size: int = 8                # sessions per tick (the engine's max_sessions)
    min_micro_turns: int = 8           # session i of n: max - (max - min) * i / (n - 1) micro-turns
    max_micro_turns: int = 30
    scenarios: list[str] = field(default_factory=list)  # empty = every scenario, round robin (typed/video first)
    seed: int = 0                      # scenario generator seed; also the fresh-weights seed
    temperature: float = 1.0           # sampling (tml.sampler.SamplingParams)
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_output_tokens: int = 16        # per-micro-turn output budget, <end> included
    plots: bool = True


@dataclass
class ServeConfig:
    """``tml serve``: websocket streaming sessions over one sampler engine
    (:mod:`tml.serve.server`; the wire protocol in :mod:`tml.serve.protocol`)."""

    checkpoint: str = "runs/tiny"      # what `make run` writes (run dir, checkpoints/ or a step dir); none = fresh
    seed: int = 0                      # fresh-weights seed; sessions without a handshake seed get seed + n
    host: str = "127.0.0.1"            # loopback only unless told otherwise
    port: int = 8998                   # 0 = any free port (printed)
    token: str = ""                    # non-empty: clients must present it (?token= or the handshake)
    max_sessions: int = 8              # sessions at once (the engine's batch)
    max_message_bytes: int = 1048577   # one frame: a 1 MiB JPEG/PNG plus its kind byte
    messages_per_second: float = 50.0  # per client (token bucket, 2 s burst)
    max_queued_chunks: int = 5         # 200 ms chunks waiting for a tick, per client
    tick_ms: float = 200.0             # one micro-turn
    max_context: int = 8192            # KV slots per session
    max_output_tokens: int = 16        # per-micro-turn output budget, <end> included
    temperature: float = 0.8
    top_p: float = 0.95
    video_size: int = 80               # frames resized to video_size^2 (40-pixel patches)
    kernel_mode: str = "batch_invariant"
    warmup: bool = True                # compile every batch bucket before printing the URL
    delegate_url: str = ""             # <delegate> requests POSTed here; empty = the local tools (clock, calc, lookup)
    lookup_file: str = ""              # a local text file for the `lookup` tool; empty = no lookup tool
    delegate_timeout_s: float = 30.0   # a background task's result after this is an error result


@dataclass
class SampleConfig:
    """``tml sample``: stream a user's audio file through one sampler session in 200 ms
    micro-turns (:mod:`tml.sampler.sample_cli`)."""

    audio: Optional[str] = None        # the user's audio: any format and rate soundfile reads (required)
    out: str = "runs/sample"           # conversation.wav, transcript.json/.txt, timeline.png, sample.json
    checkpoint: str = "runs/tiny"      # what `make run` writes (run dir, checkpoints/ or a step dir); none = fresh
    seed: int = 0                      # the session's sampling seed; also the fresh-weights seed
    context: str = ""                  # typed/system text before micro-turn 0
    tail_seconds: float = 2.0          # silence streamed after the audio, so the model can answer
    temperature: float = 0.8           # sampling (tml.sampler.SamplingParams)
    top_k: int = 0
    top_p: float = 0.95
    min_p: float = 0.0
    max_output_tokens: int = 16        # per-micro-turn output budget, <end> included
    kernel_mode: str = "batch_invariant"
    model_channel: int = 0             # the model's channel of conversation.wav: 0 = left (moshi-finetune)
    plot: bool = True
    progress: bool = True


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="tml_schema", node=TmlConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="loader", name="loader_schema", node=LoaderConfig)
    cs.store(group="train", name="train_schema", node=TrainerConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
    cs.store(group="rl", name="rl_schema", node=RLConfig)
    cs.store(group="serve", name="serve_schema", node=ServeConfig)
