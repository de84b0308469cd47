"""Writing conversations to webdataset tar shards, atomically and resumably.

A corpus folder holds::

    train-00000.tar  train-00000.stats.json  ...   eval-00000.tar ...
    manifest.json    rejects.jsonl

Each shard is a *job* (a fixed slice of the source) that one worker process turns into a
tar written to a temp file and renamed into place, then a ``.stats.json`` sidecar
(again temp + rename). A shard is finished when both exist and the tar's size and sha256
match its sidecar; a re-run skips finished shards and redoes the rest, so an interrupted
build resumes and never leaves a half-written shard, and a shard that went missing or was
damaged since (truncated, flipped bytes) is rewritten, byte-identical to the original.
Bad inputs become rejects (file + reason), never exceptions.

One sample per conversation (key = ``Conversation.id``):

* ``meta.json`` — ``Conversation.to_json()`` plus ``n_micro_turns`` and ``duration``;
* ``audio.flac`` — stereo 16 kHz PCM-16, the model on channel 0 and the user on
  channel 1 (the moshi-finetune convention);
* ``dmel.npy`` — uint8 [2, 4 n, 80] dMel bins of (user, model), computed from the
  PCM-16 audio that is stored, so the shard is self-consistent; the loader reads these
  and never needs an STFT;
* ``video.npy`` — uint8 [F, H, W, 3] at 10 fps, when the conversation has video.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import webdataset as wds
from tqdm import tqdm

from tml.audio import encode_flac
from tml.stream import Conversation, conversation_dmel
from tml.stream.layout import LAYOUT_VERSION
from tml.files import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SOURCE = "source.json"  # what the shards were built from; a re-run must match it
FORMAT_VERSION = 1


@dataclass
class Reject:
    """An input that could not be used: which file, and why."""

    path: str
    reason: str


@dataclass
class ShardJob:
    """One shard to write: its name and a picklable recipe for its conversations."""

    split: str
    index: int
    make: Callable[[], Iterable[Conversation | Reject]]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def quantize_pcm16(x: np.ndarray) -> np.ndarray:
    """float32 audio → the float32 values that PCM-16 storage will give back."""
    return (np.clip(np.round(x * 32767.0), -32768, 32767) / 32767.0).astype(np.float32)


def encode_sample(conv: Conversation) -> tuple[dict, dict]:
    """Conversation → (webdataset sample dict, stats). Validates first."""
    conv.validate()
    conv.user_audio = quantize_pcm16(conv.user_audio)
    conv.model_audio = quantize_pcm16(conv.model_audio)
    user_dmel, model_dmel = conversation_dmel(conv)
    meta = conv.to_json() | {"n_micro_turns": conv.n_micro_turns, "duration": conv.duration}
    sample = {
        "__key__": conv.id,
        "meta.json": json.dumps(meta).encode(),
        "audio.flac": encode_flac(np.stack([conv.model_audio, conv.user_audio], axis=1), 16_000),
        "dmel.npy": npy_bytes(np.stack([user_dmel, model_dmel])),
    }
    if conv.video is not None:
        sample["video.npy"] = npy_bytes(conv.video)
    stats = {"micro_turns": conv.n_micro_turns, "seconds": conv.duration, "scenario": conv.scenario}
    return sample, stats


def write_shard(job: ShardJob, out_dir: str) -> dict:
    """Run one job: write ``<name>.tar`` and ``<name>.stats.json`` atomically."""
    out = Path(out_dir)
    buf = io.BytesIO()
    n_conv = n_mt = 0
    seconds = 0.0
    scenarios: Counter = Counter()
    rejects: list[dict] = []
    keys: set[str] = set()
    with wds.TarWriter(buf, mtime=0.0) as sink:  # fixed mtime: byte-identical re-runs
        for item in job.make():
            if isinstance(item, Reject):
                rejects.append({"path": item.path, "reason": item.reason})
                continue
            try:
                if item.id in keys:
                    raise ValueError(f"duplicate conversation id {item.id!r}")
                sample, st = encode_sample(item)
            except ValueError as e:
                rejects.append({"path": item.id, "reason": str(e)})
                continue
            keys.add(item.id)
            sink.write(sample)
            n_conv += 1
            n_mt += st["micro_turns"]
            seconds += st["seconds"]
            scenarios[st["scenario"]] += 1
    data = buf.getvalue()
    atomic_write_bytes(out / f"{job.name}.tar", data)
    stats = {
        "name": f"{job.name}.tar",
        "split": job.split,
        "conversations": n_conv,
        "micro_turns": n_mt,
        "seconds": seconds,
        "scenarios": dict(scenarios),
        "rejects": rejects,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_json(out / f"{job.name}.stats.json", stats)
    return stats


def finished_stats(out_dir: Path, job: ShardJob) -> dict | None:
    """Stats of a finished shard (tar + sidecar present, size and sha256 agree), else None."""
    tar, side = out_dir / f"{job.name}.tar", out_dir / f"{job.name}.stats.json"
    if not (tar.exists() and side.exists()):
        return None
    try:
        stats = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if stats.get("bytes") != tar.stat().st_size:
        return None
    return stats if hashlib.sha256(tar.read_bytes()).hexdigest() == stats.get("sha256") else None


@dataclass
class BuildResult:
    manifest: dict
    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def build_shards(
    jobs: list[ShardJob], out_dir: str | os.PathLike, workers: int, source: dict, progress: bool = True
) -> BuildResult:
    """Write every unfinished shard with ``workers`` processes, then the manifest and the
    rejects report. Returns the manifest and how many shards were written / skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / SOURCE
    if recorded.exists():
        previous = json.loads(recorded.read_text())
        if previous != json.loads(json.dumps(source)):
            raise ValueError(
                f"{out} holds shards built from another source/config:\n  was {previous}\n  now {source}\n"
                "Choose another data.out_dir, or delete that folder to rebuild."
            )
    else:
        atomic_write_json(recorded, source)
    t0 = time.perf_counter()
    done: dict[str, dict] = {}
    todo = []
    for job in jobs:
        st = finished_stats(out, job)
        if st is None:
            todo.append(job)
        else:
            done[job.name] = st
    skipped = len(done)
    bar = tqdm(total=len(jobs), initial=skipped, desc=f"shards → {out}", unit="shard",
               disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            done[job.name] = write_shard(job, str(out))
            bar.update()
    else:
        # fork is fast (no re-import of torch/scipy per worker) but unsafe once JAX's
        # runtime has started threads; spawn then.
        ctx = get_context("spawn" if _jax_started() else "fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(write_shard, job, str(out)): job for job in todo}
            for fut in _as_completed(futures):
                done[futures[fut].name] = fut.result()
                bar.update()
    bar.close()
    stats = [done[j.name] for j in jobs]
    manifest = summarize(stats, source)
    rejects = [r | {"shard": s["name"]} for s in stats for r in s["rejects"]]
    atomic_write_bytes(out / REJECTS, "".join(json.dumps(r) + "\n" for r in rejects).encode())
    atomic_write_json(out / MANIFEST, manifest)
    return BuildResult(manifest, written=len(todo), skipped=skipped, seconds=time.perf_counter() - t0)


def _jax_started() -> bool:
    """True once a JAX backend (and its thread pools) exists in this process."""
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(xb is not None and getattr(xb, "_backends", None))


def _as_completed(futures):
    from concurrent.futures import as_completed

    return as_completed(futures)


def summarize(stats: list[dict], source: dict) -> dict:
    splits: dict[str, dict] = {}
    for s in stats:
        sp = splits.setdefault(s["split"], {"conversations": 0, "micro_turns": 0, "hours": 0.0,
                                            "scenarios": Counter(), "shards": 0})
        sp["conversations"] += s["conversations"]
        sp["micro_turns"] += s["micro_turns"]
        sp["hours"] += s["seconds"] / 3600
        sp["scenarios"].update(s["scenarios"])
        sp["shards"] += 1
    for sp in splits.values():
        sp["scenarios"] = dict(sorted(sp["scenarios"].items()))
    return {
        "format_version": FORMAT_VERSION,
        "layout_version": LAYOUT_VERSION,
        "source": source,
        "conversations": sum(s["conversations"] for s in stats),
        "micro_turns": sum(s["micro_turns"] for s in stats),
        "hours": sum(s["seconds"] for s in stats) / 3600,
        "rejects": sum(len(s["rejects"]) for s in stats),
        "splits": splits,
        "shards": [{k: s[k] for k in ("name", "split", "conversations", "micro_turns", "bytes", "sha256")}
                   for s in stats],
    }


def format_summary(manifest: dict) -> str:
    """A human-readable summary of a manifest."""
    lines = [
        f"corpus: {manifest['conversations']} conversations, {manifest['micro_turns']} micro-turns, "
        f"{manifest['hours']:.3f} h of audio, {len(manifest['shards'])} shards, "
        f"{manifest['rejects']} rejects",
    ]
    for name, sp in manifest["splits"].items():
        lines.append(f"  {name:<6} {sp['conversations']:>6} conv  {sp['micro_turns']:>8} micro-turns  "
                     f"{sp['hours']:.3f} h  {sp['shards']} shards")
        for scen, n in sp["scenarios"].items():
            lines.append(f"           {scen:<20} {n:>6}")
    return "\n".join(lines)
