"""``tml eval eval.episode_seconds=60``: held-out **minutes-long** episodes, the user reacting.

A short held-out conversation (20-40 s) is not what ``tml rl`` trains on: its episodes
are minutes long (:mod:`tml.rl.episodes`), and a small model trained on 512-token rows
behaves differently thousands of tokens into a session. With ``eval.episode_seconds >
0`` each of the ``eval.per_scenario`` samples of a scenario is one such episode:
held-out conversations ``HELD_OUT_INDEX_OFFSET + k, k + 1, ...`` of that scenario
(:func:`tml.eval.run.prepare`, never in a training corpus nor an RL step) played back
to back until the script lasts ``eval.episode_seconds``
(:func:`tml.rl.episodes.make_long_group`, ``index_offset=HELD_OUT_INDEX_OFFSET``), the
next episode going on from the next conversation. The user reacts as in ``tml rl``
(:class:`tml.rl.user.ReactiveUser`, default :class:`~tml.rl.user.Reactions`; off with
``eval.user_reacts=false``): stops when talked over for two micro-turns, asks an ignored
question again. The episodes are served in the policy's engine
(:func:`tml.rl.rollout.play`, ``eval.batch_size`` live) and scored by the same scorers on
the reference of what each user actually said (above ``eval.temperature=0`` an episode
samples from :func:`tml.rl.episodes.episode_seed` of ``eval.seed`` and its script's
name, so a run is reproducible); each sample also gets a
``user_reactions`` row (how often the user stopped or repeated, per minute).

Needs a model (``eval.policy=model | untrained``): the user's next input depends on the
model's last output, which scripted policies do not serve. ``eval.max_context=0``: the
engine holds the longest episode's KV need (:func:`tml.rl.rollout.kv_needed`, an upper
bound: every micro-turn's whole output budget, every question repeated), recorded as
``seeds["max_context"]``.
"""

from __future__ import annotations

import sys

from tml.eval.config import EvalConfig
from tml.eval.scenarios import HELD_OUT_INDEX_OFFSET


def groups_for(cfg: EvalConfig, names: list[str]) -> tuple[list, list[dict]]:
    """The held-out long episodes of ``names`` → (one single-episode group each, errors)."""
    from tml.rl.episodes import make_long_group
    from tml.rl.user import Reactions

    reactions = Reactions() if cfg.user_reacts else None
    groups, errors = [], []
    for sc in names:
        counter = 0
        for _ in range(cfg.per_scenario):
            g, skipped, counter = make_long_group(sc, cfg.seed, counter, 1, cfg.episode_seconds, reactions,
                                                  index_offset=HELD_OUT_INDEX_OFFSET)
            errors += [{"sample_id": f"{sc}-long", "error": why} for why in skipped]
            if g is None:
                errors.append({"sample_id": f"{sc}-long", "error": "too many conversations in a row could not be "
                               "generated; no further long episodes of this scenario"})
                break
            groups.append(g)
    return groups, errors


def context_needed(groups: list, max_output_tokens: int) -> int:
    """KV slots the longest episode of ``groups`` may need (every question repeated)."""
    from tml.rl.rollout import kv_needed

    return max((kv_needed(g.episodes[0], max_output_tokens) for g in groups), default=0)


def run_long(cfg: EvalConfig, policy, groups: list, errors: list[dict], names: list[str]
             ) -> tuple[list[dict], list[dict], dict]:
    """Play ``groups`` (:func:`groups_for`) in ``policy``'s engine and score them → (samples, errors, seeds)."""
    from tqdm import tqdm

    from tml.rl.rollout import play

    engine = getattr(policy, "engine", None)
    if engine is None:
        raise SystemExit(f"eval.episode_seconds={cfg.episode_seconds}: long episodes are played in the sampler's "
                         f"engine (the user reacts to its outputs); eval.policy={cfg.policy} has none: use "
                         "eval.policy=model or untrained, or eval.episode_seconds=0")
    bar = tqdm(total=len(groups), desc=f"eval {policy.name} long episodes", unit="episode", disable=not cfg.progress,
               file=sys.stderr)
    episodes, dropped = play(engine, groups, {}, context_key="eval.max_context", on_finish=lambda _: bar.update(1))
    bar.close()
    errors = errors + [{"sample_id": d.split(":")[0], "error": d} for d in dropped]
    samples = []
    for ep in episodes:
        g = groups[ep.group]
        minutes = len(ep.turns) / 300
        rows = [{k: v for k, v in r.items() if k != "credit"} for r in ep.rows]
        stopped = sum(r["kind"] == "stopped" for r in ep.reactions)
        repeated = sum(r["kind"] == "repeated" for r in ep.reactions)
        rows.append({"task": "user_reactions", "stopped_per_min": stopped / minutes,
                     "repeated_per_min": repeated / minutes, "stopped": stopped, "repeated": repeated})
        script = g.episodes[0].script
        samples.append({"sample_id": script.name, "scenario": g.scenario, "seed": cfg.seed,
                        "index": HELD_OUT_INDEX_OFFSET + g.index, "conversations": len(script.segments),
                        "micro_turns": len(ep.turns), "tasks": rows})
    seeds = {"seed": cfg.seed, "index_offset": HELD_OUT_INDEX_OFFSET, "scenarios": names,
             "episode_seconds": cfg.episode_seconds, "user_reacts": cfg.user_reacts,
             "first_indices": [HELD_OUT_INDEX_OFFSET + g.index for g in groups],
             "max_context": engine.pool.max_pages * engine.pool.page_size}
    return samples, errors, seeds


__all__ = ["context_needed", "groups_for", "run_long"]
