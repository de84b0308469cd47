"""A scripted multi-session run of the engine, shared by the alignment and engine tests.

One run per kernel mode (and dtype) serves, in one engine (prefill chunks of 8 tokens):
session 0 alone for 3 ticks, then 5 more sessions joining at ticks 3-5 (6 concurrent, of
different lengths), session 2 leaving at tick 6, session 3 rolled back to micro-turn 1 at
tick 7 and re-fed the same inputs, and at the end session 0 replayed from its seed while
another session runs (prefix warm). Two more engines on the same programs replay
session 0 alone with its whole input in one prefill call, and token by token (prefill
chunks of 1). Then :func:`tml.sampler.score` scores every finished session as one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tests.stream.random_turns import random_turns
from tml import kernels
from tml.sampler import Engine, SamplingParams, TurnInputs, score
from tml.stream import LossKind

N_TICKS = 9
JOIN = {0: 0, 1: 3, 2: 3, 3: 4, 4: 5, 5: 5}
LEAVE = {2: 6}
ROLLBACK = (3, 7, 1)  # session 3, at tick 7, back to micro-turn 1
ENGINE = dict(max_sessions=8, batch_buckets=(8,), patch_buckets=(4,), max_output_tokens=10, max_text_bytes=3,
              max_context=256, vocoder=False, sampling=SamplingParams(temperature=1.0, top_p=0.95))


def inputs_for(seed: int, n: int) -> list[TurnInputs]:
    rng = np.random.default_rng(seed)
    return [TurnInputs(dmel=t.user_audio, typed=t.typed, background=t.background,
                       video=None if t.video is None else t.video[0])  # a 40x40 frame pair
            for t in random_turns(rng, n)]


@dataclass
class Run:
    outputs: dict[str, list] = field(default_factory=dict)    # name -> [TurnOutput]
    turns: dict[str, list] = field(default_factory=dict)      # name -> committed MicroTurns
    lengths: dict[str, int] = field(default_factory=dict)
    scored: dict[str, object] = field(default_factory=dict)
    before_rollback: list = field(default_factory=list)
    compiled: int = 0


def sampler_vs_score(out_list, scored) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (sampler, trainer) log-probs of every sampled token of a session."""
    mine, theirs = [], []
    for o in out_list:
        pos = o.positions
        speech = scored.loss_kind[pos] == LossKind.SPEECH
        theirs.append(np.where(speech, scored.speech_logprobs[pos], scored.token_logprobs[pos]))
        mine.append(o.logprobs)
    return np.concatenate(mine), np.concatenate(theirs)


def run_scenario(model, mode: str) -> Run:
    run = Run()
    with kernels.kernel_mode(mode):
        eng = Engine(model, max_prefill_chunk=8, chunk_buckets=(8,), **ENGINE)
        feeds = {name: inputs_for(100 + name, N_TICKS) for name in JOIN}
        sids, seen = {}, {}
        for t in range(N_TICKS):
            for name, start in JOIN.items():
                if t == start:
                    sids[name] = eng.open(seed=name)
                    seen[name] = 0
            if ROLLBACK[1] == t:
                name = ROLLBACK[0]
                run.before_rollback = eng.outputs(sids[name])[ROLLBACK[2]:]
                eng.rollback(sids[name], ROLLBACK[2])
                seen[name] = ROLLBACK[2]
            for name in list(sids):
                if LEAVE.get(name) == t:
                    run.outputs[f"s{name}"] = eng.outputs(sids[name])
                    run.turns[f"s{name}"] = eng.turns(sids[name])
                    eng.close(sids.pop(name))
                    continue
                eng.append(sids[name], feeds[name][seen[name]])
                seen[name] += 1
            eng.tick()
        for name, sid in sids.items():
            run.outputs[f"s{name}"] = eng.outputs(sid)
            run.turns[f"s{name}"] = eng.turns(sid)
            run.lengths[f"s{name}"] = eng.length(sid)
        run.redone = eng.outputs(sids[ROLLBACK[0]])[ROLLBACK[2]:ROLLBACK[2] + len(run.before_rollback)]
        # replay session 0 from its seed, batched with a fresh session (warm engine)
        replay, other = eng.open(seed=0), eng.open(seed=77)
        for i in range(N_TICKS):
            eng.append(replay, feeds[0][i])
            eng.append(other, inputs_for(77, N_TICKS)[i])
            eng.tick()
        run.outputs["replay"] = eng.outputs(replay)
        # session 0 alone: one prefill call per micro-turn, and token by token
        for name, kw in (("alone", dict(max_prefill_chunk=32, chunk_buckets=(32,))),
                         ("by_token", dict(max_prefill_chunk=1, chunk_buckets=(1,)))):
            e = Engine(model, **kw, **ENGINE)
            sid = e.open(seed=0)
            for i in range(N_TICKS):
                e.step(sid, feeds[0][i])
            run.outputs[name], run.turns[name] = e.outputs(sid), e.turns(sid)
        run.compiled = eng.compiled_programs()
        names = sorted(run.turns)
        for name, sc in zip(names, score(model, [run.turns[n] for n in names])):
            run.scored[name] = sc
    return run
