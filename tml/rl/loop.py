"""``tml rl``: the on-policy loop (rollout → score → update → push), checkpointed.

Per step ``s`` (all under ``rl.kernel_mode``):

1. :func:`tml.rl.episodes.step_groups` picks one conversation per scenario (the scenario
   counters are RL state), ``G`` episodes each;
2. :func:`tml.rl.rollout.play` serves all of them in the running engine, batched, and
   scores them with the eval scorers (rewards ``rl.rewards``);
3. :func:`tml.rl.learner.prepare` rescores them with :func:`tml.sampler.score` (old
   log-probs, drift metrics), :func:`tml.rl.learner.learn` updates the policy;
4. the new weights go into the running engine (``Engine.set_params``: no recompilation,
   ``time/push_s`` logged with ``engine/compiled_programs``).

``<rl.run_dir>/rl_config.json`` holds the run's ``rl`` config (kernel mode ...), and
``<rl.run_dir>/metrics.jsonl`` gets, per step, the eight ``mismatch/*`` metrics
(:mod:`tml.sampler.divergence`), ``reward/mean`` and ``reward/<name>`` (mean signed value
over the step's episodes), the ``rl/*`` learner metrics (loss, clip fraction, entropy,
grad norm, k3 KL to the reference) and timings. ``<rl.run_dir>/checkpoints/`` holds the
policy, optimizer state and step (:class:`tml.train.state.TrainState` on
:class:`tml.train.checkpoint.Checkpointer`), the scenario counters in the data item;
the episode seeds are functions of (``rl.seed``, conversation, episode), so a resumed run
replays exactly what an uninterrupted one would have. The reference policy is the
initial checkpoint, pinned to its step in ``<rl.run_dir>/rl_init.json`` at the first
start (a training run adding steps later does not move it). SIGTERM saves at the next
step boundary (:mod:`tml.train.preemption`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tml import kernels
from tml.rl.config import RLConfig
from tml.rl.episodes import step_groups
from tml.rl.learner import learn, make_update, optimizer_for, prepare
from tml.rl.rewards import check_weights
from tml.rl.rollout import make_engine, play
from tml.rl.user import Reactions

log = logging.getLogger(__name__)
MODES = ("batch_invariant", "standard")
CREDITS = ("episode", "micro_turn")


def validate(c: RLConfig) -> None:
    from tml.rl.objectives import ADVANTAGES, AGGREGATIONS

    problems = []
    if c.kernel_mode not in MODES:
        problems.append(f"rl.kernel_mode={c.kernel_mode!r}: choose one of {MODES}")
    if c.group_size < 2:
        problems.append(f"rl.group_size must be >= 2 (a group baseline needs two episodes), got {c.group_size}")
    if not c.temperature > 0:
        problems.append(f"rl.temperature must be > 0 (greedy episodes of a group would be identical), got "
                        f"{c.temperature}")
    if c.advantage not in ADVANTAGES:
        problems.append(f"rl.advantage={c.advantage!r}: choose one of {ADVANTAGES}")
    if c.aggregation not in AGGREGATIONS:
        problems.append(f"rl.aggregation={c.aggregation!r}: choose one of {AGGREGATIONS}")
    if c.steps < 0 or c.ppo_epochs < 1:
        problems.append(f"rl.steps must be >= 0 and rl.ppo_epochs >= 1, got {c.steps}, {c.ppo_epochs}")
    if c.tis_cap < 0 or c.kl_coef < 0 or c.speech_weight < 0:
        problems.append(f"rl.tis_cap, rl.kl_coef and rl.speech_weight must be >= 0, got {c.tis_cap}, {c.kl_coef}, "
                        f"{c.speech_weight}")
    if c.credit not in CREDITS or c.credit_radius < 0:
        problems.append(f"rl.credit={c.credit!r}, rl.credit_radius={c.credit_radius}: choose one of {CREDITS} and a "
                        "radius >= 0")
    if c.episode_seconds < 0 or c.user_stop_after < 0 or c.user_repeat_after_s < 0 or c.user_max_repeats < 0:
        problems.append("rl.episode_seconds, rl.user_stop_after, rl.user_repeat_after_s and rl.user_max_repeats "
                        "must be >= 0")
    if c.row_tokens < 0 or c.row_tokens % kernels.SPLIT_SIZE or c.learn_rows < 0:
        problems.append(f"rl.row_tokens must be 0 or a positive multiple of {kernels.SPLIT_SIZE} and rl.learn_rows "
                        f">= 0, got {c.row_tokens}, {c.learn_rows}")
    if problems:
        raise ValueError("invalid rl config: " + "; ".join(problems))
    check_weights(c.rewards)


def _pinned_init(run_dir: Path, init: str) -> str:
    """The initial checkpoint as one step dir (pinned in rl_init.json), or "none"."""
    from tml.eval.checkpoint import NONE, resolve
    from tml.train.checkpoint import Checkpointer

    pin = run_dir / "rl_init.json"
    if pin.exists():
        return json.loads(pin.read_text())["init_checkpoint"]
    if str(init).lower() in NONE:
        resolved = "none"
    else:
        ckpt_dir, step = resolve(init)
        if step is None:
            c = Checkpointer.open_read_only(ckpt_dir)  # another run's checkpoints: never clean its saves
            step = c.latest_step()
            c.close()
        resolved = str(ckpt_dir / str(step))
    run_dir.mkdir(parents=True, exist_ok=True)
    pin.write_text(json.dumps({"init_checkpoint": resolved, "requested": init}))
    return resolved


def _canonical(state):
    """Every leaf as a jax array of its canonical dtype committed to the first device, as
    the update's outputs are. Seen here: a fresh model's state holds a numpy int64 leaf
    (int32 after a restore) and Orbax restores committed arrays where a fresh init has
    uncommitted ones; a resumed run then traced and compiled the update again (minutes on
    this CPU). Values are unchanged."""
    from tml.train.state import TrainState

    return TrainState.create(canonical(state.params), canonical(state.rest), canonical(state.opt_state), state.rng,
                             state.step)


def canonical(tree):
    """:func:`_canonical` for any pytree (e.g. weights before ``Engine.set_params``)."""
    dev = jax.local_devices()[0]  # the learner's device (tml.rl.distributed.place)
    return jax.tree_util.tree_map(lambda x: jax.device_put(jnp.asarray(np.asarray(x)), dev), tree)


def rss_gb() -> float:
    """This process's resident set size now (GB, /proc/self/status VmRSS; 0.0 where absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 0.0


def fit_rows(episodes: list, row_tokens: int) -> tuple[list, list[str]]:
    """Episodes whose laid-out row fits ``rl.row_tokens`` (0: any) → (kept, dropped with the reason)."""
    from tml.stream import layout

    if not row_tokens:
        return episodes, []
    kept, dropped = [], []
    for e in episodes:
        n = len(layout(e.turns))
        if n > row_tokens:
            log.warning("dropping episode %s: %d tokens, rl.row_tokens=%d", e.name, n, row_tokens)
            dropped.append(f"{e.name}: {n} tokens laid out, rl.row_tokens gives {row_tokens}: raise it")
        else:
            kept.append(e)
    return kept, dropped


def run(cfg) -> list[dict]:
    """``tml rl`` on a composed :class:`tml.config.TmlConfig` (``cfg.rl``, ``cfg.model``) →
    the records logged this run."""
    from tml.eval.checkpoint import load_model
    from tml.rl import distributed as dist
    from tml.sampler.snapshot import weights_digest
    from tml.train.checkpoint import Checkpointer
    from tml.train.config import WandbConfig
    from tml.train.distributed import init_distributed
    from tml.train.metrics_log import MetricsLogger
    from tml.train.preemption import install_preemption_handler
    from tml.train.state import TrainState

    logging.getLogger("absl").setLevel(logging.WARNING)
    c: RLConfig = cfg.rl
    validate(c)
    init_distributed(getattr(cfg, "distributed", None))  # two processes: learner (0) + engine (1)
    placement = dist.place(c)
    if placement.role == "engine":
        return dist.serve_engine(cfg, placement)
    remote = dist.RemoteEngine(c) if placement.remote else None
    weights = check_weights(c.rewards)
    run_dir = Path(c.run_dir)
    init = _pinned_init(run_dir, c.init_checkpoint)
    (run_dir / "rl_config.json").write_text(json.dumps(dataclasses.asdict(c), indent=1))  # tml.rl.report reads it
    model, _ = load_model(cfg.model, init, c.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref_model = nnx.merge(graphdef, params, rest)
    tx = optimizer_for(c)
    state = TrainState.create(params, rest, tx.init(params), jax.random.key(c.seed))
    counters: dict[str, int] = {}
    ckpt = Checkpointer(run_dir / "checkpoints", model_config=cfg.model, async_save=False, keep_last=2)
    if remote:
        remote.start(restore=ckpt.latest_step() is not None)
    if ckpt.latest_step() is not None:
        state, data = dist.restore_state(ckpt, state) if remote else state.restore(ckpt)
        counters = dict((data or {}).get("counters", {}))
        print(f"tml rl: resuming {run_dir} at step {state.step}")
    state = _canonical(state)
    holder = {"state": state, "counters": counters}

    def save():
        s = holder["state"]
        if s.step not in ckpt.all_steps():
            if remote:
                remote.save(s, holder["counters"], ckpt)
            else:
                s.save(ckpt, data_state={"counters": holder["counters"]}, wait=True)

    records = []
    reactions = Reactions(c.user_stop_after, c.user_repeat_after_s, c.user_max_repeats) if c.user_reacts else None
    n_sessions = len(c.scenarios) * c.group_size
    logger = MetricsLogger(run_dir, wandb=WandbConfig(mode=c.wandb_mode), config=cfg, total_steps=c.steps,
                           start_step=state.step, progress_bar=False)
    handler = install_preemption_handler(save)
    try:
        with kernels.kernel_mode(c.kernel_mode):
            if remote:
                engine, ack = None, remote.push(nnx.split(nnx.merge(graphdef, state.params, state.rest))[1])
            elif placement.engine is None:
                engine = make_engine(nnx.merge(graphdef, state.params, state.rest), n_sessions,
                                     max_context=c.max_context, temperature=c.temperature, top_p=c.top_p,
                                     max_output_tokens=c.max_output_tokens)
            else:  # tensor-parallel on devices of its own
                engine = dist.make_engine(nnx.merge(graphdef, state.params, state.rest), n_sessions, c, placement)
            update = make_update(graphdef, c, tx)
            while holder["state"].step < c.steps:
                remote.check(handler) if remote else handler.check()
                state = holder["state"]
                t0 = time.perf_counter()
                groups, skipped, new_counters = step_groups(list(c.scenarios), c.seed, holder["counters"],
                                                            c.group_size, c.max_micro_turns,
                                                            episode_seconds=c.episode_seconds, reactions=reactions)
                if remote:
                    episodes, dropped, compiled = remote.play(groups)
                else:
                    episodes, dropped = play(engine, groups, weights)
                    compiled = engine.compiled_programs()
                episodes, too_long = fit_rows(episodes, c.row_tokens)
                dropped += too_long
                if not episodes:
                    raise RuntimeError(f"step {state.step}: every episode was dropped ({dropped}): check "
                                       "rl.max_context and the scenarios")
                t1 = time.perf_counter()
                p = prepare(nnx.merge(graphdef, state.params, state.rest), ref_model, episodes, c)
                t2 = time.perf_counter()
                params, opt_state, m = learn(update, state.params, state.rest, state.opt_state, p, c)
                t3 = time.perf_counter()
                new = nnx.split(nnx.merge(graphdef, params, state.rest))[1]
                if remote:
                    ack = remote.push(new)
                else:
                    engine.set_params(new)
                    jax.block_until_ready(engine.state)
                    ack = {"compiled_programs": engine.compiled_programs(),
                           "digest": engine.weights_digest() if c.check_push else None}
                push = time.perf_counter() - t3
                holder["state"] = TrainState.create(params, state.rest, opt_state, state.rng, state.step + 1)
                holder["counters"] = new_counters
                rewards = np.array([e.reward for e in episodes])
                names = sorted({k for e in episodes for k in e.values})
                metrics = {**p.drift, **m, "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
                           **{f"reward/{k}": float(np.mean([e.values[k] for e in episodes if k in e.values]))
                              for k in names},
                           "episodes": len(episodes), "episodes_dropped": len(dropped),
                           "conversations_skipped": len(skipped), "tokens": p.tokens,
                           "micro_turns": int(sum(len(e.turns) for e in episodes)),
                           "episode/seconds_mean": float(np.mean([len(e.turns) for e in episodes])) / 5,
                           "user/stopped": sum(r["kind"] == "stopped" for e in episodes for r in e.reactions),
                           "user/repeated": sum(r["kind"] == "repeated" for e in episodes for r in e.reactions),
                           "time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/push_s": push,
                           "engine/compiled_programs": compiled, "mem/rss_gb": rss_gb(),
                           "engine/compiled_programs_after_push": ack["compiled_programs"]}
                if c.check_push:  # the engine holds the learner's bits (sha256 of every weight's raw bytes)
                    metrics["engine/push_bitwise"] = float(ack["digest"] == weights_digest(new))
                records.append(logger.log(holder["state"].step, metrics))
                print(f"tml rl step {holder['state'].step}: reward {metrics['reward/mean']:.3f} "
                      f"bitwise_equal {metrics['mismatch/bitwise_equal_fraction']:.4f} "
                      f"kl_k3 {metrics['mismatch/kl_k3']:.3g} rss {metrics['mem/rss_gb']:.2f} GB ({t3 - t0 + push:.1f} s)",
                      flush=True)
                if c.save_every and holder["state"].step % c.save_every == 0:
                    save()
        save()
        if remote:
            remote.stop()
    finally:
        handler.uninstall()
        logger.close()
        ckpt.close()
    return records


__all__ = ["MODES", "canonical", "fit_rows", "rss_gb", "run", "validate"]
