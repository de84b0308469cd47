"""Rollouts: the running engine plays every group's episodes, batched (all ``S * G``
sessions served by one ``tick()`` per micro-turn), and the eval scorers score them.

The engine is built once per run (:func:`make_engine`, one batch bucket of ``S * G``
sessions, so every tick reuses one compiled program per chunk length) and gets the
learner's weights with :meth:`tml.sampler.Engine.set_params` after every update.
Serving is :func:`tml.sampler.divergence_run.serve` (one micro-turn per session per tick,
sessions leave when their episode ends); an engine output becomes the eval's
:class:`~tml.eval.scenarios.MicroTurnOutput` exactly as :class:`tml.eval.policies.ModelPolicy`
makes it (text bytes, speaking = speech frames, control tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tml.eval.scenarios import MicroTurnOutput, SampleError, score
from tml.rl.episodes import Group
from tml.rl.rewards import episode_reward
from tml.sampler.divergence_run import max_context_for, serve
from tml.sampler.engine import Engine
from tml.sampler.sampling import SamplingParams
from tml.sampler.session import TurnOutput

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """One played episode: its group, the engine's outputs and committed turns, its scored
    task rows, reward and the signed reward values it is made of."""

    group: int
    name: str
    outputs: list[TurnOutput]
    turns: list
    rows: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    values: dict[str, float] = field(default_factory=dict)


def make_engine(model, n_sessions: int, *, max_context: int, temperature: float, top_p: float,
                max_output_tokens: int) -> Engine:
    return Engine(model, max_sessions=n_sessions, batch_buckets=(n_sessions,), max_context=max_context,
                  sampling=SamplingParams(temperature=temperature, top_p=top_p), max_output_tokens=max_output_tokens,
                  vocoder=False)


def eval_outputs(outputs: list[TurnOutput]) -> list[MicroTurnOutput]:
    """Engine outputs → the scorers' per-micro-turn outputs (as ModelPolicy makes them)."""
    return [MicroTurnOutput(o.text_bytes, len(o.speech) > 0, tuple(o.control)) for o in outputs]


def play(engine: Engine, groups: list[Group], weights: dict[str, float]) -> tuple[list[Episode], list[str]]:
    """Serve every episode of ``groups`` in ``engine`` and score it → (episodes in group
    order, dropped episodes with the reason). An episode that cannot fit the engine's
    context or cannot be scored is dropped (logged), the others go on."""
    sessions, owner, dropped = [], {}, []
    cap = engine.pool.max_pages * engine.pool.page_size
    for gi, g in enumerate(groups):
        need = max_context_for(g.sessions[:1], engine.max_output_tokens)
        if need > cap:
            msg = f"{g.sessions[0].name.rsplit('/', 1)[0]}: needs {need} KV slots, rl.max_context is {cap}"
            log.warning("dropping group %s", msg)
            dropped.append(msg)
            continue
        for s in g.sessions:
            sessions.append(s)
            owner[s.name] = gi
    outputs, turns, _ = serve(engine, sessions)
    episodes = []
    for s in sessions:
        gi = owner[s.name]
        ep = Episode(gi, s.name, outputs[s.name], turns[s.name])
        try:
            ep.rows = score(groups[gi].ref, eval_outputs(ep.outputs))
        except SampleError as e:
            log.warning("dropping episode %s: %s", s.name, e)
            dropped.append(f"{s.name}: {e}")
            continue
        ep.reward, ep.values = episode_reward(ep.rows, weights)
        episodes.append(ep)
    return episodes, dropped


__all__ = ["Episode", "eval_outputs", "make_engine", "play"]
