"""Rollouts: the running engine plays every group's episodes, batched (all ``S * G``
sessions served by one ``tick()`` per micro-turn), and the eval scorers score them.

The engine is built once per run (:func:`make_engine`, one batch bucket of ``S * G``
sessions, so every tick reuses one compiled program per chunk length) and gets the
learner's weights with :meth:`tml.sampler.Engine.set_params` after every update.
:func:`serve` feeds each session one micro-turn per tick (sessions leave when their
episode ends); an engine output becomes the eval's
:class:`~tml.eval.scenarios.MicroTurnOutput` exactly as :class:`tml.eval.policies.ModelPolicy`
makes it (text bytes, speaking = speech frames, control tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tml.eval.scenarios import MicroTurnOutput, SampleError, score
from tml.rl.episodes import EpisodeInputs, Group
from tml.rl.rewards import episode_reward
from tml.sampler.engine import Engine
from tml.sampler.sampling import SamplingParams
from tml.sampler.scripted import serve as serve_scripted
from tml.sampler.session import TurnOutput

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """One played episode: its group, the engine's outputs and committed turns, its scored
    task rows (with the scorers' ``credit``), reward and the signed reward values it is
    made of; ``keys`` names each row's task the same way in every episode of the group
    (the task index, or (segment, task, repeat) of a long script); ``reactions`` what
    its user did (:class:`tml.rl.user.ReactiveUser`)."""

    group: int
    name: str
    outputs: list[TurnOutput]
    turns: list
    rows: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    values: dict[str, float] = field(default_factory=dict)
    keys: list = field(default_factory=list)
    reactions: list[dict] = field(default_factory=list)


def make_engine(model, n_sessions: int, *, max_context: int, temperature: float, top_p: float,
                max_output_tokens: int) -> Engine:
    return Engine(model, max_sessions=n_sessions, batch_buckets=(n_sessions,), max_context=max_context,
                  sampling=SamplingParams(temperature=temperature, top_p=top_p), max_output_tokens=max_output_tokens,
                  vocoder=False)


def eval_outputs(outputs: list[TurnOutput]) -> list[MicroTurnOutput]:
    """Engine outputs → the scorers' per-micro-turn outputs (as ModelPolicy makes them)."""
    return [MicroTurnOutput(o.text_bytes, len(o.speech) > 0, tuple(o.control)) for o in outputs]


def kv_needed(e, max_output_tokens: int) -> int:
    """KV slots an episode can need: its inputs laid out by the one layout function plus
    the whole output budget in every micro-turn (a long episode: every question repeated
    as often as its user may, :meth:`tml.rl.user.LongScript.max_micro_turns`)."""
    from tml.audio import HOP_LENGTH
    from tml.sampler.session import check_inputs
    from tml.stream import MicroTurn, layout

    inputs = e.inputs if hasattr(e, "inputs") else _upper_bound_inputs(e)
    tail, n = np.zeros(HOP_LENGTH, np.float32), 0
    for t, x in enumerate(inputs):
        bins, p, tail = check_inputs(x, tail)
        turn = MicroTurn(user_audio=bins, video=p, typed=x.typed, background=x.background)
        n += len(layout([turn], outputs=False, first_micro_turn=t, first_position=n)) + max_output_tokens
    return n


def _upper_bound_inputs(e) -> list:
    """A long episode's inputs with each question's micro-turns repeated as often as allowed."""
    from tml.rl.user import _mt

    out = []
    for k, s in enumerate(e.script.segments):
        out += [s.inputs[0]] * (e.script.gap if k else 0) + list(s.inputs)
        if e.reactions.repeat_after_s > 0:
            for q in s.questions:
                a, b = s.utterances[q]
                out += s.inputs[_mt(a):_mt(b) + 1] * e.reactions.max_repeats
    return out


def serve(engine: Engine, episodes: list[EpisodeInputs], on_finish=None
          ) -> tuple[dict[str, list[TurnOutput]], dict[str, list]]:
    """Every episode one micro-turn per tick, all live together (``engine.max_sessions``
    at most; the next joins when one ends) → per name: outputs, committed turns. The one
    scripted-session loop, :func:`tml.sampler.scripted.serve` (``on_finish`` as there)."""
    outputs, turns, _ = serve_scripted(engine, episodes, on_finish)
    return outputs, turns


def play(engine: Engine, groups: list[Group], weights: dict[str, float], *, context_key: str = "rl.max_context",
         on_finish=None) -> tuple[list[Episode], list[str]]:
    """Serve every episode of ``groups`` in ``engine`` and score it → (episodes in group
    order, dropped episodes with the reason). A group that cannot fit the engine's
    context (``context_key`` names the setting to raise), or an episode that cannot be
    scored, is dropped (logged); the others go on. ``on_finish(name)``: as each episode
    ends (:func:`tml.sampler.scripted.serve`). ``tml eval eval.episode_seconds=...``
    plays its held-out long episodes here too (:mod:`tml.eval.long_episodes`)."""
    sessions, owner, dropped = [], {}, []
    cap = engine.pool.max_pages * engine.pool.page_size
    for gi, g in enumerate(groups):
        need = kv_needed(g.episodes[0], engine.max_output_tokens)
        if need > cap:
            name = g.ref.sample_id if g.ref is not None else g.episodes[0].script.name
            msg = f"{name}: may need {need} KV slots, {context_key} gives {cap}: raise it"
            log.warning("dropping group %s", msg)
            dropped.append(msg)
            continue
        for e in g.episodes:
            sessions.append(e)
            owner[e.name] = gi
    outputs, turns = serve(engine, sessions, on_finish)
    episodes = []
    for e in sessions:
        gi = owner[e.name]
        ep = Episode(gi, e.name, outputs[e.name], turns[e.name])
        try:
            if groups[gi].ref is not None:
                ref, ep.keys = groups[gi].ref, list(range(len(groups[gi].ref.tasks)))
            else:
                ref = e.user.reference()
                ep.keys, ep.reactions = [tuple(k) for k in ref.meta["task_keys"]], list(e.user.reactions)
            ep.rows = score(ref, eval_outputs(ep.outputs), credit=True)
        except SampleError as err:
            log.warning("dropping episode %s: %s", e.name, err)
            dropped.append(f"{e.name}: {err}")
            continue
        ep.reward, ep.values = episode_reward(ep.rows, weights)
        episodes.append(ep)
    return episodes, dropped


__all__ = ["Episode", "eval_outputs", "kv_needed", "make_engine", "play", "serve"]
