"""``tml divergence``: run scripted sessions through the engine in each kernel mode, score
them with the trainer, and measure the drift (:mod:`tml.sampler.divergence`).

Sessions (:func:`held_out_sessions`) are held-out synthetic conversations —
``make_conversation(scenario, seed, HELD_OUT_INDEX_OFFSET + k)``, the indices no training
corpus holds (:mod:`tml.eval.scenarios`), prepared by :func:`tml.eval.run.prepare` —
with their user audio (3,200 samples per micro-turn, through the engine's streaming dMel
front end), video frame pairs and typed / background text as inputs. Session ``i`` of
``n`` is cut to ``max_micro_turns - (max_micro_turns - min_micro_turns) * i / (n - 1)``
micro-turns (or its conversation's length, if shorter), so a tick batches sessions of
different lengths and the short ones leave first.

:func:`run_mode`, under one kernel mode, serves them ``batch_size`` at a time in one
:class:`~tml.sampler.Engine` (one batch bucket: a tick with fewer live sessions pads
rather than compiling another program), feeding each session one micro-turn per tick;
a finished session closes and the next one joins at the next tick. Then
:func:`tml.sampler.score` rescores every finished session as one row, and each sampled
token's sampler log-prob is compared with the trainer's (:func:`tml.sampler.score.trainer_logprobs`);
the serving loop is :func:`tml.sampler.scripted.serve`.
The two modes run the same inputs and seeds but may sample different tokens (``standard``
log-probs differ, so do the draws), so each mode is compared with its own scoring.

:func:`run` is the command: it loads the model (:func:`tml.eval.checkpoint.load_model`:
``divergence.checkpoint``, by default the one ``make run`` writes, or ``none`` for
fresh weights), runs every mode, writes ``<out>/divergence.json`` and the plots
(:mod:`tml.sampler.divergence_report`) and prints the summary table.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tml import kernels
from tml.sampler.divergence import METRICS, drift_metrics, session_drift
from tml.sampler.engine import Engine
from tml.sampler.sampling import SamplingParams
from tml.sampler.score import score, trainer_logprobs
from tml.sampler.scripted import serve
from tml.sampler.session import TurnInputs
from tml.stream import LossKind

MODES = ("batch_invariant", "standard")
KINDS = {"text": LossKind.TEXT, "speech": LossKind.SPEECH, "control": LossKind.CONTROL}


@dataclass
class ScriptedSession:
    """One scripted session: ``name`` (the conversation id), where it came from, the
    session seed, and its micro-turn inputs in order."""

    name: str
    scenario: str
    index: int
    seed: int
    inputs: list[TurnInputs]


def session_lengths(n: int, min_micro_turns: int, max_micro_turns: int) -> list[int]:
    """Target micro-turns of sessions 0..n-1: evenly spread from max (session 0) down to min."""
    if not 1 <= min_micro_turns <= max_micro_turns:
        raise ValueError(f"need 1 <= min_micro_turns ({min_micro_turns}) <= max_micro_turns ({max_micro_turns})")
    if n == 1:
        return [max_micro_turns]
    return [max_micro_turns - (max_micro_turns - min_micro_turns) * i // (n - 1) for i in range(n)]


# Scenarios whose inputs go beyond user audio, taken first (by the longest sessions) when
# divergence.scenarios is empty: delegate's background result arrives at micro-turn 24-28
# of the first held-out conversations, typed_text's question at 2-14, rep_count has video
# throughout (measured on data.seed 0, k = 0..3).
INPUTS_FIRST = ("delegate", "typed_text", "rep_count")


def held_out_sessions(n: int, *, seed: int = 0, scenarios: tuple[str, ...] | list[str] = (),
                      min_micro_turns: int = 8, max_micro_turns: int = 30) -> list[ScriptedSession]:
    """``n`` held-out scenario sessions (module docstring), scenarios taken round robin
    (empty: every scenario of the synthetic corpus, :data:`INPUTS_FIRST` first). Session
    seeds are the crc32 of the conversation id, so no two sessions share random bits."""
    import zlib

    from tml.data_pipelines.scenarios import SCENARIOS
    from tml.eval.run import prepare

    if n < 1:
        raise ValueError(f"divergence.sessions must be >= 1, got {n}")
    names = list(scenarios) or [*INPUTS_FIRST, *(x for x in SCENARIOS if x not in INPUTS_FIRST)]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}: choose from {list(SCENARIOS)}")
    out = []
    for i, target in enumerate(session_lengths(n, min_micro_turns, max_micro_turns)):
        p = prepare(names[i % len(names)], seed, i // len(names))
        if p.error:
            raise ValueError(f"held-out scenario {p.sample_id} could not be generated: {p.error}")
        inputs = [TurnInputs(audio=x.audio, video=x.video, typed=x.typed, background=x.background)
                  for x in p.sample.inputs()]
        out.append(ScriptedSession(p.sample_id, p.scenario, p.index, zlib.crc32(p.sample_id.encode()),
                                   inputs[:target]))
    return out


def input_counts(s: ScriptedSession) -> dict[str, int]:
    """Micro-turns of a session carrying each kind of input."""
    return {"audio": len(s.inputs), "video": sum(x.video is not None for x in s.inputs),
            "typed": sum(bool(x.typed) for x in s.inputs), "background": sum(bool(x.background) for x in s.inputs)}


def engine_shapes(sessions: list[ScriptedSession], max_output_tokens: int) -> tuple[int, int]:
    """(KV slots the longest session can need: its inputs laid out by the one layout
    function plus the whole output budget in every micro-turn; the most patches one
    micro-turn's frame pair makes, at least 1)."""
    from tml.audio import HOP_LENGTH
    from tml.sampler.session import check_inputs
    from tml.stream import MicroTurn, layout

    need, patches = 0, 1
    for s in sessions:
        tail = np.zeros(HOP_LENGTH, np.float32)
        n = 0
        for t, x in enumerate(s.inputs):
            bins, p, tail = check_inputs(x, tail)
            patches = max(patches, 0 if p is None else len(p))
            turn = MicroTurn(user_audio=bins, video=p, typed=x.typed, background=x.background)
            n += len(layout([turn], outputs=False, first_micro_turn=t, first_position=n)) + max_output_tokens
        need = max(need, n)
    return need, patches


@dataclass
class ModeResult:
    """One kernel mode's comparison. ``metrics`` over every sampled token of every session;
    ``by_kind`` the same per output kind (text / speech frames / control); ``sessions``
    one dict per session (name, micro-turns, row length, tokens, first diverging token and
    position, its metrics); ``positions`` / ``abs_diff`` per session [N_s] (row slot,
    |trainer - sampler|); ``seconds`` sample / score wall time."""

    mode: str
    metrics: dict[str, float]
    by_kind: dict[str, dict[str, float]]
    sessions: list[dict[str, Any]]
    positions: list[np.ndarray] = field(repr=False)
    abs_diff: list[np.ndarray] = field(repr=False)
    seconds: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "by_kind": self.by_kind, "sessions": self.sessions,
                "seconds": self.seconds,
                "abs_diff_by_position": [{"positions": p.tolist(), "abs_diff": d.tolist()}
                                         for p, d in zip(self.positions, self.abs_diff)]}


def run_mode(model, sessions: list[ScriptedSession], mode: str, *, batch_size: int = 8,
             sampling: SamplingParams = SamplingParams(), max_output_tokens: int = 16,
             prefill_chunk: int = 32) -> ModeResult:
    """Serve ``sessions`` under kernel ``mode`` (``batch_size`` per tick), score them with
    :func:`tml.sampler.score` under the same mode, compare (module docstring).

    The engine gets one shape per axis (``batch_size`` rows, prefill chunks of
    ``prefill_chunk`` tokens, the sessions' largest patch count), so a mode compiles one
    prefill and one decode program. Measured on the 2-core CPU (4 short sessions of the
    tiny test model, a loaded machine), the engine's
    default buckets compiled 3 programs per mode and the run (serve + score) took 6.7 s
    (``standard``) / 16.3 s (``batch_invariant``) of CPU; one shape per axis, 2 programs
    and 5.2 s / 11.9 s."""
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: choose from {MODES}")
    if batch_size < 1:
        raise ValueError(f"batch_size (sessions per tick) must be >= 1, got {batch_size}")
    max_context, patches = engine_shapes(sessions, max_output_tokens)
    with kernels.kernel_mode(mode):
        t0 = time.perf_counter()
        engine = Engine(model, max_sessions=batch_size, batch_buckets=(batch_size,), chunk_buckets=(prefill_chunk,),
                        patch_buckets=(patches,), max_context=max_context, sampling=sampling,
                        max_output_tokens=max_output_tokens, vocoder=False)
        outputs, turns, lengths = serve(engine, sessions)
        t1 = time.perf_counter()
        names = [s.name for s in sessions]
        scored = dict(zip(names, score(model, [turns[n] for n in names])))
        t2 = time.perf_counter()
    rows, all_s, all_t, all_k, positions, diffs = [], [], [], [], [], []
    for s in sessions:
        sam, tra, pos, kind = trainer_logprobs(outputs[s.name], scored[s.name])
        d = session_drift(sam, tra, pos)
        rows.append({"name": s.name, "scenario": s.scenario, "index": s.index, "seed": s.seed,
                     "micro_turns": len(s.inputs), "row_length": lengths[s.name], "tokens": d.tokens,
                     "first_diverging_token": d.first_diverging_token,
                     "first_diverging_position": d.first_diverging_position, "metrics": d.metrics})
        all_s.append(sam), all_t.append(tra), all_k.append(kind), positions.append(pos)
        diffs.append(np.abs(tra.astype(np.float64) - sam.astype(np.float64)))
    sam, tra, kind = np.concatenate(all_s), np.concatenate(all_t), np.concatenate(all_k)
    by_kind = {name: drift_metrics(sam[kind == k], tra[kind == k]) | {"tokens": int(np.sum(kind == k))}
               for name, k in KINDS.items() if np.any(kind == k)}
    return ModeResult(mode, drift_metrics(sam, tra), by_kind, rows, positions, diffs,
                      {"sample": round(t1 - t0, 3), "score": round(t2 - t1, 3)})


def run(cfg) -> dict[str, Any]:
    """``tml divergence`` on the composed :class:`tml.config.TmlConfig` (its ``divergence``
    and ``model``) → the divergence.json dict (also written to ``<out>``)."""
    from pathlib import Path

    from tml.eval.checkpoint import load_model
    from tml.files import atomic_write_json
    from tml.sampler import divergence_report as report

    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-restore INFO lines
    c = cfg.divergence
    unknown = sorted(set(c.modes) - set(MODES))
    if unknown or not c.modes:
        raise SystemExit(f"divergence.modes={list(c.modes)}: choose one or more of {list(MODES)}")
    t0 = time.perf_counter()
    try:
        sessions = held_out_sessions(c.sessions, seed=c.seed, scenarios=tuple(c.scenarios),
                                     min_micro_turns=c.min_micro_turns, max_micro_turns=c.max_micro_turns)
        sampling = SamplingParams(c.temperature, c.top_k, c.top_p, c.min_p).validate()
        model, loaded = load_model(cfg.model, c.checkpoint, c.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # each names what to pass instead
        raise SystemExit(f"tml divergence: {e}") from None
    t_setup = time.perf_counter() - t0
    results = {mode: run_mode(model, sessions, mode, batch_size=c.batch_size, sampling=sampling,
                              max_output_tokens=c.max_output_tokens) for mode in c.modes}
    out = Path(c.out)
    doc = {
        "config": dataclasses.asdict(c),
        "model": {"name": cfg.model.name, "checkpoint": loaded.checkpoint, "step": loaded.step,
                  "init_seed": loaded.seed, "dtype": str(cfg.model.compute_dtype())},
        "metrics": list(METRICS),
        "sessions": [{"name": s.name, "scenario": s.scenario, "index": s.index, "seed": s.seed,
                      "micro_turns": len(s.inputs), "inputs": input_counts(s)} for s in sessions],
        "modes": {mode: r.to_json() for mode, r in results.items()},
        "seconds": {"setup": round(t_setup, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    atomic_write_json(out / "divergence.json", doc)
    plots = report.plot(results, out, title=f"{cfg.model.name}, {loaded.describe()}") if c.plots else []
    print(f"tml divergence: {cfg.model.name}, {loaded.describe()}; {len(sessions)} held-out sessions "
          f"({sum(len(s.inputs) for s in sessions)} micro-turns), {c.batch_size} per tick")
    print(report.table(results))
    print(f"wrote {out / 'divergence.json'}" + "".join(f", {p}" for p in plots)
          + f" ({doc['seconds']['total']:.1f} s)")
    return doc


__all__ = ["MODES", "ModeResult", "ScriptedSession", "engine_shapes", "held_out_sessions", "input_counts", "run", "run_mode",
           "serve", "session_lengths", "trainer_logprobs"]
