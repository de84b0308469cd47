"""``tml data build``: turn a source (synthetic corpus or a real corpus) into shards."""

from __future__ import annotations

import functools
from typing import Iterator

from tml.config import DataConfig
from tml.data_pipelines.shards import BuildResult, ShardJob, build_shards

EVAL_INDEX_OFFSET = 1_000_000_000  # eval conversations use their own index range


def synthetic_slice(seed: int, first: int, stop: int, scenarios: tuple[str, ...]) -> Iterator:
    """Conversations ``first .. stop-1`` of the synthetic corpus (scenarios cycled)."""
    from tml.data_pipelines.scenarios import SCENARIOS, make_conversation

    names = scenarios or SCENARIOS
    for i in range(first, stop):
        yield make_conversation(names[i % len(names)], seed, i)


def moshi_slice(manifest: str, first: int, stop: int, assistant_channel: int, video_dir) -> Iterator:
    """Entries ``first .. stop-1`` of a moshi-finetune manifest (conversations or rejects)."""
    from tml.data_pipelines.ingest import iter_moshi_corpus

    yield from iter_moshi_corpus(
        manifest, assistant_channel=assistant_channel, video_dir=video_dir, lines=(first, stop)
    )


def count_manifest_lines(manifest: str) -> int:
    with open(manifest, "rb") as f:
        return sum(1 for _ in f)


def plan_jobs(cfg: DataConfig) -> list[ShardJob]:
    """The fixed list of shard jobs for a data config (the same on every re-run)."""
    per = cfg.conversations_per_shard
    if per <= 0:
        raise ValueError("data.conversations_per_shard must be positive")
    jobs: list[ShardJob] = []
    if cfg.source == "synthetic":
        from tml.data_pipelines.scenarios import SCENARIOS

        unknown = sorted(set(cfg.scenarios) - set(SCENARIOS))
        if unknown:
            raise ValueError(f"data.scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
        names = tuple(cfg.scenarios)
        for split, total, offset in (("train", cfg.n_conversations, 0),
                                     ("eval", cfg.eval_conversations, EVAL_INDEX_OFFSET)):
            for k, first in enumerate(range(0, total, per)):
                stop = min(first + per, total)
                jobs.append(ShardJob(split, k, functools.partial(
                    synthetic_slice, cfg.seed, offset + first, offset + stop, names)))
    elif cfg.source == "moshi":
        if not cfg.manifest:
            raise ValueError("data=moshi needs data.manifest=/path/to/manifest.jsonl")
        total = count_manifest_lines(cfg.manifest)
        for k, first in enumerate(range(0, total, per)):
            stop = min(first + per, total)
            jobs.append(ShardJob("train", k, functools.partial(
                moshi_slice, cfg.manifest, first, stop, cfg.assistant_channel, cfg.video_dir)))
    else:
        raise ValueError(f"data.source={cfg.source!r}: expected 'synthetic' or 'moshi'")
    return jobs


def build_corpus(cfg: DataConfig, progress: bool = True) -> BuildResult:
    source = {k: getattr(cfg, k) for k in ("source", "seed", "n_conversations", "eval_conversations",
                                            "manifest", "conversations_per_shard")}
    return build_shards(plan_jobs(cfg), cfg.out_dir, cfg.workers, source, progress=progress)
