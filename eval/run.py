"""``tml eval``: stream samples through a policy, score them, write eval.json, print, plot.

Two sources (``eval.source``, recipes ``recipes/eval/scenarios.yaml`` and ``fdb.yaml``):

* ``scenarios`` -- ``eval.per_scenario`` held-out conversations of each synthetic scenario
  (``make_conversation(scenario, eval.seed, HELD_OUT_INDEX_OFFSET + k)``, see
  :mod:`tml.eval.scenarios` for why these are never in a training corpus), their
  synthesised user audio, video, typed text and background results streamed to the
  policy one 200 ms micro-turn per tick (:func:`tml.eval.policies.stream`, at most
  ``eval.batch_size`` sessions live), then scored task by task.
  With ``eval.episode_seconds > 0`` each sample is instead a held-out **minutes-long**
  episode, conversations back to back, the user reacting to the model as in ``tml rl``
  (:mod:`tml.eval.long_episodes`).
* ``fdb`` -- a directory in Full-Duplex-Bench's sample layout (:mod:`tml.eval.fdb_dir`),
  each sample scored by its own task (pause handling, smooth turn-taking, user
  interruption or backchannel, detected from its metadata json). With
  ``eval.policy=model|untrained|silent`` (:func:`run_fdb_policy`) the policy runs on
  each sample's ``input.wav`` (16 kHz mono, streamed as 3,200-sample micro-turns like
  the scenarios) and its text channel is the transcript
  (:func:`tml.eval.fdb_dir.policy_timeline`). With ``eval.policy=outputs``
  (:func:`run_fdb`) no policy runs: the outputs the folder already holds
  (``output.wav`` / ``output.json``) are scored; ``oracle`` -- the EvalConfig default,
  which has no script on an FD-bench folder -- means the same. The ``eval=fdb`` recipe
  (``recipes/eval/fdb.yaml``) defaults to ``eval.policy=model`` (``eval.checkpoint``,
  ``runs/tiny`` by default).

``<out>/eval.json`` holds ``config``, ``policy``, ``source``, ``seeds`` (generator seed,
index offset, the indices used), ``samples`` (per sample: id, scenario or task, seed,
index, and per task the scorer's numbers), ``errors`` (per skipped sample: id and
reason), ``tasks`` (per task: :func:`tml.eval.aggregate`'s means, stds and counts) and
``published`` (the figures printed beside them, with sources). A bad sample is reported
on stderr and in ``errors`` and the others are scored. Besides the scorers' tasks, every
scenario sample has an ``activity`` row (:mod:`tml.eval.activity`: what the policy did
beside the targets) and, for ``eval.policy=model|untrained``, a ``target_nll`` row
(:mod:`tml.eval.target_loss`: the model's teacher-forced loss on that conversation's
targets); those runs also record ``model`` (checkpoint, step or init seed, model config)
and every scenario run ``timing`` (seconds, per sample and per micro-turn).

``eval.policy=model`` (:class:`tml.eval.policies.ModelPolicy`) restores ``eval.checkpoint``
(:mod:`tml.eval.checkpoint`) onto ``cfg.model`` and serves it with the streaming sampler,
``eval.batch_size`` sessions per tick, greedy by default (``eval.temperature=0``: the
run is reproducible; above 0 each sample samples from its own seed, ``eval.seed ^
index``). ``eval.policy=untrained`` is the same model freshly initialised with
``train.seed``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tml.eval.activity import activity
from tml.eval.aggregate import aggregate
from tml.eval.config import EvalConfig
from tml.eval.policies import (AlwaysSilent, MicroTurnInput, ModelPolicy, ModelSampling, Policy, Sample, ScriptedOracle,
                               stream, targets)
from tml.eval.published import MODELS, PUBLISHED, SOURCES
from tml.eval.scenarios import HELD_OUT_INDEX_OFFSET, Reference, SampleError, reference, score
from tml.eval.target_loss import target_nll

POLICIES = ("oracle", "silent", "model", "untrained")
FDB_OUTPUTS = ("outputs", "oracle")
"""``eval.source=fdb`` policies that score the folder's own output.json (no policy runs)."""


def make_policy(cfg: EvalConfig, model_cfg=None, seed: int = 0, *, max_context: int = 0) -> Policy:
    """The policy ``eval.policy`` names. ``model`` / ``untrained`` need ``model_cfg`` (the
    run's ``cfg.model``); ``untrained`` (or ``model`` with ``eval.checkpoint=none``) is
    initialised with ``seed`` (``train.seed``), ``model`` restored from ``eval.checkpoint``
    (:mod:`tml.eval.checkpoint`). ``max_context``: the engine's KV slots per session
    (0: ``eval.max_context``, or 4096 when that is 0 too)."""
    if cfg.policy == "oracle":
        return ScriptedOracle()
    if cfg.policy == "silent":
        return AlwaysSilent()
    if cfg.policy in ("model", "untrained"):
        from tml.eval.checkpoint import load_model

        if model_cfg is None:
            raise SystemExit(f"eval.policy={cfg.policy} needs the model config: run it as `tml eval` (which "
                             "composes model=...), or call tml.eval.run.main(TmlConfig)")
        try:
            sampling = ModelSampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.max_output_tokens,
                                     max_context=max_context or cfg.max_context or ModelSampling.max_context,
                                     inputs=cfg.inputs)
            checkpoint = None if cfg.policy == "untrained" else cfg.checkpoint
            model, loaded = load_model(model_cfg, checkpoint, seed)
        except (FileNotFoundError, ValueError, RuntimeError) as e:  # the checkpoint errors name what to do
            raise SystemExit(f"tml eval: {e}") from None
        name = "model" if loaded.checkpoint is not None else "untrained"
        policy = ModelPolicy(model, name=name, max_sessions=cfg.batch_size, sampling=sampling)
        policy.loaded = loaded
        return policy
    raise SystemExit(f"eval.policy={cfg.policy!r}: choose one of {POLICIES}"
                     + (" (or outputs: score the folder's own output.json)" if cfg.source == "fdb" else ""))


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
    micro_turns: list | None = None     # inputs and target outputs (tml.stream.MicroTurn), for target_nll


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
        p.micro_turns = mts
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
                rows = score(p.ref, done.outputs) + [activity(done.outputs, p.sample.script)]
            except SampleError as e:
                done.error = str(e)
        if done.error is not None:
            errors.append({"sample_id": p.sample_id, "error": done.error})
            continue
        samples.append({"sample_id": p.sample_id, "scenario": p.scenario, "seed": p.seed, "index": p.index,
                        "micro_turns": p.ref.n_micro_turns, "tasks": rows})
    bar.close()
    model = getattr(policy, "model", None)
    if model is not None and samples:  # the model's loss on these conversations' targets
        for s, row in zip(samples, target_nll(model, [by_id[s["sample_id"]].micro_turns for s in samples])):
            s["tasks"].append(row)
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


def run_fdb_policy(cfg: EvalConfig, policy: Policy) -> tuple[list[dict], list[dict], dict]:
    """Run ``policy`` on every sample's ``input.wav`` of a Full-Duplex-Bench folder and score
    its outputs with the sample's task -> (samples, errors, seeds).

    A sample whose ``input.wav`` is missing or unreadable, or whose metadata is malformed, is
    recorded in ``errors`` with the reason and skipped; the rest are streamed (at most
    ``eval.batch_size`` live) and scored. Session seed: ``eval.seed ^ k`` for the k-th folder.
    """
    from tqdm import tqdm

    from tml.audio import FRAMES_PER_MICRO_TURN, dmel
    from tml.eval.fdb_dir import (SAMPLES_PER_MICRO_TURN, annotations, detect_task, find_reference, policy_timeline,
                                  read_input, sample_dirs, score_timeline)

    if not cfg.fdb_dir:
        raise SystemExit("eval.source=fdb needs eval.fdb_dir=/path/to/<task folder> (Full-Duplex-Bench layout)")
    try:
        dirs = sample_dirs(cfg.fdb_dir)
        ref = find_reference(Path(cfg.fdb_dir), cfg.fdb_reference)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    want_dmel = getattr(getattr(policy, "sampling", None), "inputs", "audio") == "dmel"
    errors: list[dict] = []
    meta: dict[str, tuple[Path, str, int, int]] = {}  # sample id -> (folder, task, index, micro-turns)

    def inputs(audio: np.ndarray) -> Iterator[MicroTurnInput]:
        bins = dmel(audio) if want_dmel else None
        for t in range(len(audio) // SAMPLES_PER_MICRO_TURN):
            d = (bins[t * FRAMES_PER_MICRO_TURN:(t + 1) * FRAMES_PER_MICRO_TURN] if want_dmel
                 else np.zeros((FRAMES_PER_MICRO_TURN, 80), np.uint8))
            yield MicroTurnInput(t, audio[t * SAMPLES_PER_MICRO_TURN:(t + 1) * SAMPLES_PER_MICRO_TURN], d)

    def samples_to_stream() -> Iterator[Sample]:  # lazy: a sample's audio is read when its session joins
        for k, folder in enumerate(dirs):
            task = cfg.fdb_task
            try:
                if task == "auto":
                    task = detect_task(folder)
                annotations(folder, task, ref)  # malformed metadata: skipped before it is streamed
                audio = read_input(folder)
            except (SampleError, ValueError) as e:
                errors.append({"sample_id": folder.name, "error": str(e)})
                bar.update(1)
                continue
            n = len(audio) // SAMPLES_PER_MICRO_TURN
            meta[folder.name] = (folder, task, k, n)
            yield Sample(folder.name, cfg.seed ^ k, n, lambda a=audio: inputs(a))

    samples: list[dict] = []
    bar = tqdm(total=len(dirs), desc=f"eval fdb {policy.name}", unit="sample", disable=not cfg.progress,
               file=sys.stderr)
    for done in stream(policy, samples_to_stream(), cfg.batch_size):
        bar.update(1)
        sid = done.sample.sample_id
        folder, task, k, n = meta[sid]
        if done.error is None:
            try:
                scores = score_timeline(policy_timeline(folder, task, done.outputs, ref), task)
            except (SampleError, ValueError) as e:
                done.error = str(e)
        if done.error is not None:
            errors.append({"sample_id": sid, "error": done.error})
            continue
        samples.append({"sample_id": sid, "scenario": task, "seed": cfg.seed ^ k, "index": k, "micro_turns": n,
                        "tasks": [{"task": task, **scores}]})
    bar.close()
    order = {d.name: i for i, d in enumerate(dirs)}
    samples.sort(key=lambda s: order[s["sample_id"]])
    errors.sort(key=lambda e: order.get(e["sample_id"], len(order)))
    return samples, errors, {"fdb_dir": str(cfg.fdb_dir), "seed": cfg.seed}


# ------------------------------------------------------------------ the command
def summarise(samples: list[dict]) -> dict[str, dict[str, Any]]:
    """Per-task aggregates over every sample's task rows."""
    per_task: dict[str, list[dict]] = {}
    for s in samples:
        for row in s["tasks"]:
            per_task.setdefault(row["task"], []).append({k: v for k, v in row.items() if k not in ("task", "window")})
    return aggregate(per_task)


def out_dir(cfg: EvalConfig, policy_name: str) -> Path:
    """``eval.out`` with ``{policy}`` replaced by the policy's name (``fdb`` for a folder)."""
    return Path(cfg.out.replace("{policy}", policy_name.replace(" ", "_")))


def run(cfg: EvalConfig, policy: Policy | None = None, *, quiet: bool = False, model_cfg=None,
        seed: int = 0) -> dict[str, Any]:
    """Run ``tml eval`` (module docstring); returns the eval.json dict (also written to ``<out>``).

    ``model_cfg`` / ``seed``: the run's ``cfg.model`` and ``train.seed``, needed by
    ``eval.policy=model|untrained`` (:func:`main` passes them)."""
    import time

    from tml import kernels
    from tml.eval import report as rep
    from tml.files import atomic_write_json

    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if cfg.source not in ("scenarios", "fdb"):
        raise SystemExit(f"eval.source={cfg.source!r}: choose scenarios or fdb (recipes eval=scenarios | eval=fdb)")
    if cfg.source == "fdb" and policy is None and cfg.policy in FDB_OUTPUTS:
        samples, errors, seeds = run_fdb(cfg)
        policy_name = "fdb outputs"
    else:
        long = None
        if cfg.episode_seconds:  # minutes-long held-out episodes (tml.eval.long_episodes)
            from tml.eval import long_episodes

            if cfg.source != "scenarios" or cfg.episode_seconds < 0:
                raise SystemExit(f"eval.episode_seconds={cfg.episode_seconds}: long episodes are made of held-out "
                                 "scenarios: use eval.source=scenarios and a duration > 0 (0 = one conversation each)")
            names = scenario_list(cfg)
            groups, long_errors = long_episodes.groups_for(cfg, names)
            need = long_episodes.context_needed(groups, cfg.max_output_tokens)
            long = (groups, long_errors, names)
            policy = policy or make_policy(cfg, model_cfg, seed, max_context=cfg.max_context or need)
        policy = policy or make_policy(cfg, model_cfg, seed)
        loaded = getattr(policy, "loaded", None)
        if loaded is not None:
            extra["model"] = {"checkpoint": loaded.checkpoint, "step": loaded.step, "init_seed": loaded.seed,
                              "model_config": dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg)
                              else None}
        t_stream, cpu = time.perf_counter(), time.process_time()
        with kernels.kernel_mode(cfg.kernel_mode):
            if long is not None:
                samples, errors, seeds = long_episodes.run_long(cfg, policy, *long)
            else:
                samples, errors, seeds = (run_scenarios if cfg.source == "scenarios" else run_fdb_policy)(cfg, policy)
        seconds = time.perf_counter() - t_stream
        n_mt = sum(s["micro_turns"] for s in samples)
        # wall seconds (compilation included) and this process's CPU seconds: on a shared
        # machine the wall time says more about the neighbours than about tml
        extra["timing"] = {"stream_and_score_s": round(seconds, 3), "setup_s": round(t_stream - t0, 3),
                           "cpu_s": round(time.process_time() - cpu, 3),
                           "samples": len(samples), "micro_turns": n_mt,
                           "s_per_sample": round(seconds / max(len(samples), 1), 4),
                           "ms_per_micro_turn": round(1e3 * seconds / max(n_mt, 1), 3)}
        policy_name = policy.name
    for e in errors:
        print(f"tml eval: skipped {e['sample_id']}: {e['error']}", file=sys.stderr)
    out = out_dir(cfg, policy_name)
    result = {
        "config": dataclasses.asdict(cfg),
        "policy": policy_name,
        "source": cfg.source,
        **extra,
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
        if "model" in extra:
            m = extra["model"]
            print(f"model: {m['checkpoint']} step {m['step']}" if m["checkpoint"] else
                  f"model: untrained (fresh init, train.seed={m['init_seed']})")
        print(rep.table(result))
        print()
        print(rep.comparison(result))
        if "timing" in extra:
            t = extra["timing"]
            print(f"\n{t['samples']} samples, {t['micro_turns']} micro-turns in {t['stream_and_score_s']:.1f} s "
                  f"({t['cpu_s']:.1f} CPU s; {t['s_per_sample']:.2f} s/sample, {t['ms_per_micro_turn']:.1f} "
                  "ms/micro-turn, compilation included)")
        print(f"\nwrote {out / 'eval.json'}" + "".join(f", {p}" for p in plots))
    return result


def main(cfg) -> dict[str, Any]:
    """``tml eval``: :func:`run` on the composed :class:`tml.config.TmlConfig` (its ``eval``,
    ``model`` and ``train.seed``)."""
    return run(cfg.eval, model_cfg=cfg.model, seed=cfg.train.seed)
