"""``tml eval``: stream samples through a policy, score them, write eval.json, print, plot.

Two sources (``eval.source``, recipes ``recipes/eval/scenarios.yaml`` and ``fdb.yaml``):

* ``scenarios`` -- ``eval.per_scenario`` held-out conversations of each synthetic scenario
  (``make_conversation(scenario, eval.seed, HELD_OUT_INDEX_OFFSET + k)``, see
  :mod:`tml.eval.scenarios` for why these are never in a training corpus), their
  synthesised user audio, video, typed text and background results streamed to the
  policy one 200 ms micro-turn per tick (:func:`tml.eval.policies.stream`, at most
  ``eval.batch_size`` sessions live), then scored task by task.
* ``fdb`` -- a directory in Full-Duplex-Bench's sample layout (:mod:`tml.eval.fdb_dir`):
  the model outputs it already holds are scored; no policy runs.

``<out>/eval.json`` holds ``config``, ``policy``, ``source``, ``seeds`` (generator seed,
index offset, the indices used), ``samples`` (per sample: id, scenario or task, seed,
index, and per task the scorer's numbers), ``errors`` (per skipped sample: id and
reason), ``tasks`` (per task: :func:`tml.eval.aggregate`'s means, stds and counts) and
``published`` (the figures printed beside them, with sources). A bad sample is reported
on stderr and in ``errors`` and the others are scored.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tml.eval.aggregate import aggregate
from tml.eval.config import EvalConfig
from tml.eval.policies import AlwaysSilent, MicroTurnInput, Policy, Sample, ScriptedOracle, stream, targets
from tml.eval.published import MODELS, PUBLISHED, SOURCES
from tml.eval.scenarios import HELD_OUT_INDEX_OFFSET, Reference, SampleError, reference, score

POLICIES = ("oracle", "silent", "model")


def make_policy(cfg: EvalConfig) -> Policy:
    """The policy ``eval.policy`` names."""
    if cfg.policy == "oracle":
        return ScriptedOracle()
    if cfg.policy == "silent":
        return AlwaysSilent()
    if cfg.policy == "model":
        raise SystemExit(
            "eval.policy=model needs the streaming sampler engine (tml.sampler, issue 9), which this tree does "
            f"not have yet; use eval.policy=oracle or eval.policy=silent (checkpoint {cfg.checkpoint!r} not read)"
        )
    raise SystemExit(f"eval.policy={cfg.policy!r}: choose one of {POLICIES}")


# ------------------------------------------------------------------ scenarios
@dataclasses.dataclass
class Prepared:
    """One held-out scenario: where it came from, its reference, and its streamable sample."""

    sample_id: str
    scenario: str
    seed: int
    index: int
    ref: Reference | None = None
    sample: Sample | None = None
    error: str | None = None


def _inputs(conv, micro_turns) -> Iterator[MicroTurnInput]:
    from tml.stream.conversation import SAMPLES_PER_MICRO_TURN
    from tml.stream.micro_turns import pad_to_micro_turns

    audio = pad_to_micro_turns(conv.user_audio)
    for t, m in enumerate(micro_turns):
        pair = None
        if conv.video is not None and 2 * t < len(conv.video):
            pair = conv.video[2 * t:2 * t + 2]
            pair = pair if len(pair) == 2 else np.concatenate([pair, pair])  # an odd last frame, duplicated
        yield MicroTurnInput(t, audio[t * SAMPLES_PER_MICRO_TURN:(t + 1) * SAMPLES_PER_MICRO_TURN],
                             m.user_audio, pair, m.typed, m.background)


def prepare(scenario: str, seed: int, k: int) -> Prepared:
    """Held-out conversation ``k`` of ``scenario``: generated, cut into micro-turns, referenced."""
    from tml.data_pipelines.scenarios import make_conversation
    from tml.stream import to_micro_turns

    index = HELD_OUT_INDEX_OFFSET + k
    p = Prepared(f"{scenario}-s{seed}-{index}", scenario, seed, index)
    try:
        conv = make_conversation(scenario, seed, index)
        mts = to_micro_turns(conv)
        p.ref = reference(conv)
        p.sample_id = conv.id
        p.sample = Sample(conv.id, seed ^ index, len(mts), lambda: _inputs(conv, mts), targets(mts))
    except (SampleError, ValueError, RuntimeError) as e:
        p.error = f"{p.sample_id}: {e}"
    return p


def scenario_list(cfg: EvalConfig) -> list[str]:
    from tml.data_pipelines.scenarios import SCENARIOS

    names = list(cfg.scenarios) or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"eval.scenarios: unknown {unknown}; choose from {list(SCENARIOS)}")
    if cfg.per_scenario < 1:
        raise SystemExit(f"eval.per_scenario must be >= 1, got {cfg.per_scenario}")
    return names


def run_scenarios(cfg: EvalConfig, policy: Policy) -> tuple[list[dict], list[dict], dict]:
    """Stream every held-out scenario through ``policy`` and score it -> (samples, errors, seeds)."""
    from tqdm import tqdm

    names = scenario_list(cfg)
    prepared = [prepare(sc, cfg.seed, k) for k in range(cfg.per_scenario) for sc in names]
    samples, errors = [], []
    by_id = {}
    for p in prepared:
        if p.error:
            errors.append({"sample_id": p.sample_id, "error": p.error})
        else:
            by_id[p.sample_id] = p
    bar = tqdm(total=len(by_id), desc=f"eval {policy.name}", unit="sample", disable=not cfg.progress, file=sys.stderr)
    for done in stream(policy, (p.sample for p in by_id.values()), cfg.batch_size):
        bar.update(1)
        p = by_id[done.sample.sample_id]
        if done.error is None:
            try:
                rows = score(p.ref, done.outputs)
            except SampleError as e:
                done.error = str(e)
        if done.error is not None:
            errors.append({"sample_id": p.sample_id, "error": done.error})
            continue
        samples.append({"sample_id": p.sample_id, "scenario": p.scenario, "seed": p.seed, "index": p.index,
                        "micro_turns": p.ref.n_micro_turns, "tasks": rows})
    bar.close()
    order = {p.sample_id: i for i, p in enumerate(prepared)}
    samples.sort(key=lambda s: order[s["sample_id"]])
    seeds = {"seed": cfg.seed, "index_offset": HELD_OUT_INDEX_OFFSET,
             "indices": [HELD_OUT_INDEX_OFFSET + k for k in range(cfg.per_scenario)], "scenarios": names}
    return samples, errors, seeds


# ------------------------------------------------------------------ FD-bench folder
def run_fdb(cfg: EvalConfig) -> tuple[list[dict], list[dict], dict]:
    """Score the samples of a Full-Duplex-Bench folder -> (samples, errors, seeds)."""
    from tqdm import tqdm

    from tml.eval.fdb_dir import iter_samples, sample_dirs

    if not cfg.fdb_dir:
        raise SystemExit("eval.source=fdb needs eval.fdb_dir=/path/to/<task folder> (Full-Duplex-Bench layout)")
    try:
        total = len(sample_dirs(cfg.fdb_dir))
        it = iter_samples(cfg.fdb_dir, cfg.fdb_task, cfg.fdb_reference)
        samples, errors = [], []
        for sid, task, scores, error in tqdm(it, total=total, desc="eval fdb", unit="sample",
                                             disable=not cfg.progress, file=sys.stderr):
            if error is not None:
                errors.append({"sample_id": sid, "error": error})
            else:
                samples.append({"sample_id": sid, "scenario": task, "tasks": [{"task": task, **scores}]})
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    return samples, errors, {"fdb_dir": str(cfg.fdb_dir)}


# ------------------------------------------------------------------ the command
def summarise(samples: list[dict]) -> dict[str, dict[str, Any]]:
    """Per-task aggregates over every sample's task rows."""
    per_task: dict[str, list[dict]] = {}
    for s in samples:
        for row in s["tasks"]:
            per_task.setdefault(row["task"], []).append({k: v for k, v in row.items() if k not in ("task", "window")})
    return aggregate(per_task)


def run(cfg: EvalConfig, policy: Policy | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """Run ``tml eval`` (module docstring); returns the eval.json dict (also written to ``<out>``)."""
    from tml.eval import report as rep
    from tml.files import atomic_write_json

    if cfg.source == "scenarios":
        policy = policy or make_policy(cfg)
        samples, errors, seeds = run_scenarios(cfg, policy)
        policy_name = policy.name
    elif cfg.source == "fdb":
        samples, errors, seeds = run_fdb(cfg)
        policy_name = "fdb outputs"
    else:
        raise SystemExit(f"eval.source={cfg.source!r}: choose scenarios or fdb (recipes eval=scenarios | eval=fdb)")
    for e in errors:
        print(f"tml eval: skipped {e['sample_id']}: {e['error']}", file=sys.stderr)
    out = Path(cfg.out)
    result = {
        "config": dataclasses.asdict(cfg),
        "policy": policy_name,
        "source": cfg.source,
        "seeds": seeds,
        "samples": samples,
        "errors": errors,
        "tasks": summarise(samples),
        "published": {"models": list(MODELS), "sources": SOURCES,
                      "figures": [{"task": t, "metric": m, **v} for (t, m), v in PUBLISHED.items()]},
    }
    atomic_write_json(out / "eval.json", result)
    plots = rep.plot(result, out) if cfg.plots and samples else []
    if not quiet:
        print(rep.table(result))
        print()
        print(rep.comparison(result))
        print(f"\nwrote {out / 'eval.json'}" + "".join(f", {p}" for p in plots))
    return result
