"""``tml data bench``: corpus build and loader throughput, 1 vs 2 workers, in one run.

Prints a table and writes JSON (``bench.out``). Throughput is measured, never asserted:
targets (2 cores) are corpus build ≥ 1,000 micro-turns/s and a loader ≥ 10× the tiny
model's training consumption (``bench.model_tokens_per_second``, when known).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tml.config import TmlConfig
from tml.data_pipelines.build import build_corpus
from tml.bench_report import environment, write_report
from tml.data_pipelines.loader import ShardLoader


def bench_build(cfg: TmlConfig, workers: int, root: Path) -> dict:
    data = replace(cfg.data, out_dir=str(root / f"build-w{workers}"), workers=workers,
                   n_conversations=cfg.bench.conversations, eval_conversations=0,
                   conversations_per_shard=max(1, cfg.bench.conversations // 8))
    t0 = time.perf_counter()
    res = build_corpus(data, progress=False)
    dt = time.perf_counter() - t0
    m = res.manifest
    return {"workers": workers, "seconds": dt, "micro_turns": m["micro_turns"],
            "micro_turns_per_s": m["micro_turns"] / dt,
            "audio_seconds_per_s": m["hours"] * 3600 / dt, "out_dir": data.out_dir}


def bench_loader(cfg: TmlConfig, data_dir: str, workers: int) -> dict:
    lc = cfg.loader
    loader = ShardLoader(data_dir, split="train", row_length=lc.row_length,
                         max_patches=lc.max_patches_per_row, batch_size=cfg.bench.loader_batch_size,
                         align=lc.align, seed=lc.seed, workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker spawn) is not throughput
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(cfg.bench.loader_batches):
        batch = next(it)
        tokens += int((batch.segment_ids > 0).sum())
    dt = time.perf_counter() - t0
    return {"workers": workers, "seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
            "batches": cfg.bench.loader_batches}


def run_bench(cfg: TmlConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="tml-bench-") as tmp:
        root = Path(tmp)
        builds = [bench_build(cfg, w, root) for w in (1, 2)]
        loaders = [bench_loader(cfg, builds[0]["out_dir"], w) for w in (0, 1, 2)]
    consumption = cfg.bench.model_tokens_per_second
    result = {
        "build": builds,
        "loader": loaders,
        "build_speedup_2_vs_1": builds[1]["micro_turns_per_s"] / builds[0]["micro_turns_per_s"],
        "model_tokens_per_second": consumption or None,
        "loader_over_model": (max(l["tokens_per_s"] for l in loaders) / consumption) if consumption else None,
    }
    print(f"{'corpus build':<22}{'workers':>8}{'micro-turns/s':>15}{'audio s/s':>11}{'seconds':>9}")
    for b in builds:
        print(f"{'':<22}{b['workers']:>8}{b['micro_turns_per_s']:>15.0f}{b['audio_seconds_per_s']:>11.0f}"
              f"{b['seconds']:>9.2f}")
    print(f"{'  2 workers / 1 worker':<22}{result['build_speedup_2_vs_1']:>23.2f}x")
    print(f"{'loader (packed)':<22}{'workers':>8}{'tokens/s':>15}{'':>11}{'seconds':>9}")
    for l in loaders:
        print(f"{'':<22}{l['workers']:>8}{l['tokens_per_s']:>15.0f}{'':>11}{l['seconds']:>9.2f}")
    if consumption:
        print(f"loader / tiny-model consumption: {result['loader_over_model']:.1f}x (target ≥ 10x)")
    write_report(cfg.bench.out, result | {"environment": environment()})
    return result
