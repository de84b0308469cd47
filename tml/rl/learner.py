"""The learner: old log-probs from :func:`tml.sampler.score`, the drift metrics, the
policy-gradient update, the weight push.

For a batch of played episodes (:class:`tml.rl.rollout.Episode`):

1. **Old log-probs**: :func:`tml.sampler.score` rescores every episode's committed turns
   as one row with the current weights (the trainer's program); each sampled token's
   value is read at the slot the engine reported
   (:func:`tml.sampler.score.trainer_logprobs`: a speech frame is the sum of its 80
   channel log-probs). In ``batch_invariant`` mode they equal the engine's bit for
   bit; :func:`tml.sampler.divergence.drift_metrics` over all tokens gives the
   ``mismatch/*`` metrics of the step.
2. **Rows**: ``layout(turns)`` padded exactly as ``score`` pads them
   (:func:`tml.sampler.score.pad_rows`: same length bucket, same patch bucket), so the
   gradient is taken through the program that produced the old log-probs. The action
   mask [B, L-1] is the sampled slots (index ``p - 1`` predicts slot ``p``).
   ``rl.row_tokens`` fixes ``L`` for the run (one compiled shape for score and the
   update; the power-of-two bucket of each step's longest row recompiled both whenever
   it changed) and ``rl.learn_rows`` scores and differentiates that many rows at a time,
   the gradients summed (memory ~ rows x L: a full batch of 8192-token rows grew past
   11 GB on the demo); in ``batch_invariant`` a row's bits do not depend on its batch,
   so the first epoch's ratio stays exactly 1.
3. **Loss** (:mod:`tml.rl.objectives`): PPO-clip on ``exp(logp - old)`` with each
   token's advantage (:func:`token_advantages`: the episode's group advantage, or the
   advantages of the scorers' events around the token's micro-turn), optionally weighted by
   truncated IS of trainer vs sampler log-probs, plus ``kl_coef`` × k3 KL to the frozen
   initial policy (its log-probs from ``score`` as well). AdamW
   (:func:`tml.train.optim.make_optimizer`, constant learning rate, no weight decay).
   The MoE balance biases (the model's non-``Param`` state) are not updated by RL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tml import kernels
from tml.model.loss import token_logprobs
from tml.rl import objectives as obj
from tml.rl.config import RLConfig
from tml.rl.rollout import Episode
from tml.sampler.divergence import drift_metrics
from tml.sampler.score import pad_rows, score, trainer_logprobs
from tml.stream import layout
from tml.train.config import OptimConfig
from tml.train.optim import make_optimizer


def optimizer_for(c: RLConfig) -> optax.GradientTransformation:
    return make_optimizer(OptimConfig(lr=c.lr, warmup_steps=0, total_steps=0, weight_decay=0.0,
                                      clip_norm=c.clip_norm))


@dataclass
class Prepared:
    """One update's inputs (host arrays): ``batch`` the padded rows; ``mask``, ``sampler``,
    ``old``, ``ref`` float32 [B, L-1] (action slots; the engine's, the current trainer's and
    the reference's log-probs there); ``advantages`` float32 [B, L-1] (each action's,
    :func:`token_advantages`); ``drift`` the mismatch metrics."""

    batch: dict
    mask: np.ndarray
    sampler: np.ndarray
    old: np.ndarray
    ref: np.ndarray
    advantages: np.ndarray
    drift: dict[str, float]
    tokens: int


def advantages_of(episodes: list[Episode], c: RLConfig) -> np.ndarray:
    """Group baselines over each group's surviving episodes → float32 [B]."""
    adv = np.zeros(len(episodes), np.float32)
    for g in sorted({e.group for e in episodes}):
        idx = [i for i, e in enumerate(episodes) if e.group == g]
        r = jnp.asarray([[episodes[i].reward for i in idx]], jnp.float32)
        adv[idx] = np.asarray(obj.group_advantages(r, estimator=c.advantage, std_normalize=c.std_normalize))[0]
    return adv


def micro_turn_advantages(episodes: list[Episode], c: RLConfig) -> list[np.ndarray]:
    """Per-micro-turn credit (``rl.credit=micro_turn``) → per episode float32 [n micro-turns].

    Each task row's share of the reward (:func:`tml.rl.rewards.task_shares`) gets a group
    baseline among the group's episodes that have the same task (``Episode.keys``):
    ``a = share - mean(shares)``, divided (``grpo`` with ``std_normalize``) by the root
    mean square of every such difference in the group (+1e-6; a group whose shares all
    agree gets 0). Every micro-turn of the task's region (:func:`tml.rl.rewards.credit_region`,
    ``rl.credit_radius``) gets ``a``; micro-turns in several regions get the sum, in none 0."""
    from tml.rl.rewards import credit_region, task_shares

    out = [np.zeros(len(e.outputs), np.float32) for e in episodes]
    weights = dict(c.rewards)
    for g in sorted({e.group for e in episodes}):
        idx = [i for i, e in enumerate(episodes) if e.group == g]
        shares = {i: dict(zip(episodes[i].keys, task_shares(episodes[i].rows, weights))) for i in idx}
        keys = sorted({k for i in idx for k in shares[i]}, key=repr)
        diff = {}
        for k in keys:
            have = [i for i in idx if k in shares[i]]
            mean = float(np.mean([shares[i][k] for i in have]))
            for i in have:
                diff[(i, k)] = shares[i][k] - mean
        scale = 1.0
        if c.advantage == "grpo" and c.std_normalize:
            scale = float(np.sqrt(np.mean(np.square(list(diff.values()))))) + obj.STD_EPS if diff else 1.0
        for i in idx:
            e = episodes[i]
            for k, row in zip(e.keys, e.rows):
                region, _ = credit_region(row, c.credit_radius)
                t0, t1 = row["window"]
                out[i][t0:t1][region] += diff[(i, k)] / scale
    return out


def token_advantages(episodes: list[Episode], c: RLConfig, positions: list[np.ndarray], shape) -> np.ndarray:
    """float32 ``shape`` [B, L-1]: each sampled token's advantage at its action slot —
    the episode's (``rl.credit=episode``, :func:`advantages_of`) or its micro-turn's
    (``micro_turn``, :func:`micro_turn_advantages`)."""
    if c.credit == "episode":
        adv = advantages_of(episodes, c)
        return _at_slots([np.full(len(p), a, np.float32) for a, p in zip(adv, positions)], positions, shape)
    per_mt = micro_turn_advantages(episodes, c)
    rows = [np.repeat(a, [len(o.positions) for o in e.outputs]) for a, e in zip(per_mt, episodes)]
    return _at_slots(rows, positions, shape)


def _at_slots(rows: list[np.ndarray], positions: list[np.ndarray], shape) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    for b, (v, p) in enumerate(zip(rows, positions)):
        out[b, p - 1] = v
    return out


def row_length(c: RLConfig) -> int | None:
    """The learner's (and ``score``'s) row length: ``rl.row_tokens`` (one compiled shape
    for the whole run), or None (the power-of-two bucket of the step's longest row)."""
    return c.row_tokens or None


def prepare(model, ref_model, episodes: list[Episode], c: RLConfig) -> Prepared:
    """Steps 1-2 of the module docstring (``model``: the weights the engine sampled with).
    Rows are scored ``rl.learn_rows`` at a time (0: all at once), ``rl.row_tokens`` long."""
    turns = [e.turns for e in episodes]
    B = len(episodes)
    L = row_length(c)
    bs = c.learn_rows or B
    scored = score(model, turns, batch_size=bs, length=L)
    sam, tra, pos = [], [], []
    for e, s in zip(episodes, scored):
        a, b, p, _ = trainer_logprobs(e.outputs, s)
        sam.append(a), tra.append(b), pos.append(p)
    drift = drift_metrics(np.concatenate(sam), np.concatenate(tra))
    batch = {k: np.asarray(v) for k, v in pad_rows([layout(t) for t in turns], L).items()}
    shape = (B, batch["tokens"].shape[1] - 1)
    mask = _at_slots([np.ones(len(p), np.float32) for p in pos], pos, shape)
    if c.kl_coef > 0:
        ref = []
        for e, s in zip(episodes, score(ref_model, turns, batch_size=bs, length=L)):
            ref.append(trainer_logprobs(e.outputs, s)[1])
        ref = _at_slots(ref, pos, shape)
    else:
        ref = np.zeros(shape, np.float32)
    return Prepared(batch, mask, _at_slots(sam, pos, shape), _at_slots(tra, pos, shape), ref,
                    token_advantages(episodes, c, pos, shape), drift, int(sum(len(p) for p in pos)))


class Update(NamedTuple):
    """The learner's two jitted programs (:func:`_make_update`)."""

    grad: object    # (params, rest, batch, mask, weight, sampler, old, ref, adv) -> (grads, sums)
    apply: object   # (params, opt_state, grads) -> (params, opt_state, grad_norm)
    add: object     # (tree, tree) -> tree


_UPDATES: list[tuple[object, tuple, Update]] = []  # (graphdef, loss fields, programs): one per run config


def _loss_key(c: RLConfig) -> tuple:
    return (c.clip_eps, c.clip_eps_high, c.tis_cap, c.kl_coef, c.aggregation, c.speech_weight, c.max_output_tokens,
            c.max_micro_turns, c.episode_seconds, c.lr, c.clip_norm)


def make_update(graphdef, c: RLConfig, tx: optax.GradientTransformation) -> Update:
    """Shared by runs of one architecture and loss config (a resumed run in the same
    process compiles nothing new), else :func:`_make_update`."""
    for g, key, fn in _UPDATES:
        if g == graphdef and key == _loss_key(c):
            return fn
    fn = _make_update(graphdef, c, tx)
    _UPDATES.append((graphdef, _loss_key(c), fn))
    return fn


def _make_update(graphdef, c: RLConfig, tx: optax.GradientTransformation) -> Update:
    """→ :class:`Update`. ``grad`` takes one micro-batch of rows [b, L] and returns the
    gradient of ``sum(weight * per-token loss)`` (``weight`` [b, L-1]: the aggregation's
    per-token weights over the whole batch, :func:`tml.rl.objectives.aggregation_weights`,
    so the micro-batches' gradients add up to the full batch's) and the sums the metrics
    are made of; ``apply`` one AdamW step on the summed gradients. They recompile only for
    a new row shape (and kernel mode): ``rl.row_tokens`` and ``rl.learn_rows`` fix it."""

    def loss_fn(params, rest, batch, mask, weight, sampler, old, ref, adv):
        out = nnx.merge(graphdef, params, rest)(batch)
        lp = token_logprobs(out, batch)
        logp = jnp.where(lp["speech_mask"], kernels.pairwise_sum(lp["speech"], -1), lp["token"])
        per_tok, ratio, clipped = obj.ppo_clip(logp, old, adv, mask, eps_low=c.clip_eps, eps_high=c.clip_eps_high)
        if c.tis_cap > 0:
            per_tok = per_tok * obj.truncated_is_weights(old, sampler, mask, c.tis_cap)
        kl = obj.kl_k3(logp, ref, mask)
        on = mask > 0
        pg_weight = jnp.where(lp["speech_mask"], weight * c.speech_weight, weight) if c.speech_weight != 1.0 else weight
        pg = jnp.sum(jnp.where(on, pg_weight * per_tok, 0.0))
        loss = pg + (c.kl_coef * jnp.sum(jnp.where(on, weight * kl, 0.0)) if c.kl_coef > 0 else 0.0)
        ent_text = obj.entropy(kernels.log_softmax(jax.lax.stop_gradient(out.text_logits[:, :-1]).astype(jnp.float32)))
        ent_sp = obj.entropy(kernels.log_softmax(jax.lax.stop_gradient(out.speech_logits[:, :-1]).astype(jnp.float32)))
        ent = jnp.where(lp["speech_mask"], ent_sp.sum(-1), ent_text)
        total = lambda x: jnp.sum(jnp.where(on, x, 0.0))
        sums = {"rl/pg_loss": pg, "rl/loss": loss, "n": jnp.sum(on.astype(jnp.float32)),
                "rl/clip_fraction": total(clipped.astype(jnp.float32)), "rl/ratio_mean": total(ratio),
                "rl/entropy": total(ent), "rl/kl_ref": total(kl) if c.kl_coef > 0 else jnp.float32(0.0),
                "rl/ratio_min": jnp.min(jnp.where(on, ratio, jnp.inf)),
                "rl/ratio_max": jnp.max(jnp.where(on, ratio, -jnp.inf))}
        return loss, sums

    def grad(params, rest, batch, mask, weight, sampler, old, ref, adv):
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch, mask, weight, sampler,
                                                                     old, ref, adv)
        return grads, sums

    def apply(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

    return Update(jax.jit(grad), jax.jit(apply), jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)))


_SUMMED = ("rl/pg_loss", "rl/loss", "n", "rl/clip_fraction", "rl/ratio_mean", "rl/entropy", "rl/kl_ref")
_MEANS = ("rl/clip_fraction", "rl/ratio_mean", "rl/entropy", "rl/kl_ref")


def learn(update: Update, params, rest, opt_state, p: Prepared, c: RLConfig):
    """``rl.ppo_epochs`` full-batch updates on one prepared batch, each the sum of the
    gradients of micro-batches of ``rl.learn_rows`` rows (0: one micro-batch) → (params,
    opt_state, metrics of the first epoch plus the last epoch's clip fraction and seconds)."""
    micro_turns = round(c.episode_seconds * 5) if c.episode_seconds > 0 else max(c.max_micro_turns, 1)
    weight = obj.aggregation_weights(p.mask, c.aggregation, constant=float(c.max_output_tokens * micro_turns))
    B = p.mask.shape[0]
    bs = c.learn_rows or B
    chunks = []
    for i in range(0, B, bs):  # the last micro-batch padded with masked-out copies of its first row: one shape
        idx = np.arange(i, i + bs) % B
        keep = (np.arange(i, i + bs) < B)[:, None].astype(np.float32)
        arrays = [p.mask[idx] * keep, weight[idx] * keep, p.sampler[idx], p.old[idx], p.ref[idx], p.advantages[idx]]
        chunks.append(({k: jnp.asarray(v[idx]) for k, v in p.batch.items()}, [jnp.asarray(a) for a in arrays]))
    t0 = time.perf_counter()
    first = last = None
    for _ in range(c.ppo_epochs):
        grads, sums = None, []
        for batch, arrays in chunks:
            g, s = update.grad(params, rest, batch, *arrays)
            grads = g if grads is None else update.add(grads, g)
            sums.append(s)
        params, opt_state, gnorm = update.apply(params, opt_state, grads)
        last = _metrics(sums, gnorm)
        first = first or last
    metrics = dict(first)
    metrics["rl/clip_fraction_last_epoch"] = last["rl/clip_fraction"]
    jax.block_until_ready(params)
    metrics["time/learn_s"] = time.perf_counter() - t0
    return params, opt_state, metrics


def _metrics(sums: list[dict], grad_norm) -> dict[str, float]:
    """Micro-batch sums → the epoch's metrics (masked means over every action token)."""
    tot = {k: float(sum(float(s[k]) for s in sums)) for k in _SUMMED}
    out = {k: tot[k] for k in ("rl/pg_loss", "rl/loss")}
    out.update({k: tot[k] / max(tot["n"], 1.0) for k in _MEANS})
    out["rl/ratio_min"] = min(float(s["rl/ratio_min"]) for s in sums)
    out["rl/ratio_max"] = max(float(s["rl/ratio_max"]) for s in sums)
    out["rl/grad_norm"] = float(grad_norm)
    return out


__all__ = ["Prepared", "Update", "advantages_of", "learn", "make_update", "micro_turn_advantages", "optimizer_for",
           "prepare", "row_length", "token_advantages"]
