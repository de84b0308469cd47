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
3. **Loss** (:mod:`tml.rl.objectives`): PPO-clip on ``exp(logp - old)`` with the
   episode's group advantage on every one of its tokens, optionally weighted by
   truncated IS of trainer vs sampler log-probs, plus ``kl_coef`` × k3 KL to the frozen
   initial policy (its log-probs from ``score`` as well). AdamW
   (:func:`tml.train.optim.make_optimizer`, constant learning rate, no weight decay).
   The MoE balance biases (the model's non-``Param`` state) are not updated by RL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
    the reference's log-probs there); ``advantages`` [B]; ``drift`` the mismatch metrics."""

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


def _at_slots(rows: list[np.ndarray], positions: list[np.ndarray], shape) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    for b, (v, p) in enumerate(zip(rows, positions)):
        out[b, p - 1] = v
    return out


def prepare(model, ref_model, episodes: list[Episode], c: RLConfig) -> Prepared:
    """Steps 1-2 of the module docstring (``model``: the weights the engine sampled with)."""
    turns = [e.turns for e in episodes]
    B = len(episodes)
    scored = score(model, turns, batch_size=B)
    sam, tra, pos = [], [], []
    for e, s in zip(episodes, scored):
        a, b, p, _ = trainer_logprobs(e.outputs, s)
        sam.append(a), tra.append(b), pos.append(p)
    drift = drift_metrics(np.concatenate(sam), np.concatenate(tra))
    batch = pad_rows([layout(t) for t in turns])
    shape = (B, batch["tokens"].shape[1] - 1)
    mask = _at_slots([np.ones(len(p), np.float32) for p in pos], pos, shape)
    if c.kl_coef > 0:
        ref = []
        for e, s in zip(episodes, score(ref_model, turns, batch_size=B)):
            ref.append(trainer_logprobs(e.outputs, s)[1])
        ref = _at_slots(ref, pos, shape)
    else:
        ref = np.zeros(shape, np.float32)
    return Prepared(batch, mask, _at_slots(sam, pos, shape), _at_slots(tra, pos, shape), ref,
                    advantages_of(episodes, c), drift, int(sum(len(p) for p in pos)))


_UPDATES: list[tuple[object, tuple, object]] = []  # (graphdef, loss fields, jitted update): one per run config


def _loss_key(c: RLConfig) -> tuple:
    return (c.clip_eps, c.clip_eps_high, c.tis_cap, c.kl_coef, c.aggregation, c.max_output_tokens,
            c.max_micro_turns, c.lr, c.clip_norm)


def make_update(graphdef, c: RLConfig, tx: optax.GradientTransformation):
    """Shared by runs of one architecture and loss config (a resumed run in the same
    process compiles nothing new), else :func:`_make_update`."""
    for g, key, fn in _UPDATES:
        if g == graphdef and key == _loss_key(c):
            return fn
    fn = _make_update(graphdef, c, tx)
    _UPDATES.append((graphdef, _loss_key(c), fn))
    return fn


def _make_update(graphdef, c: RLConfig, tx: optax.GradientTransformation):
    """→ jitted ``update(params, rest, opt_state, batch, mask, sampler, old, ref, adv)`` →
    (params, opt_state, metrics). One full-batch gradient step; recompiles only for a new
    row-length bucket (and kernel mode)."""
    constant = float(c.max_output_tokens * max(c.max_micro_turns, 1))

    def loss_fn(params, rest, batch, mask, sampler, old, ref, adv):
        out = nnx.merge(graphdef, params, rest)(batch)
        lp = token_logprobs(out, batch)
        logp = jnp.where(lp["speech_mask"], kernels.pairwise_sum(lp["speech"], -1), lp["token"])
        per_tok, ratio, clipped = obj.ppo_clip(logp, old, adv, mask, eps_low=c.clip_eps, eps_high=c.clip_eps_high)
        if c.tis_cap > 0:
            per_tok = per_tok * obj.truncated_is_weights(old, sampler, mask, c.tis_cap)
        kl = obj.kl_k3(logp, ref, mask)
        loss = obj.aggregate(per_tok, mask, c.aggregation, constant=constant)
        if c.kl_coef > 0:
            loss = loss + c.kl_coef * obj.aggregate(kl, mask, c.aggregation, constant=constant)
        ent_text = obj.entropy(kernels.log_softmax(jax.lax.stop_gradient(out.text_logits[:, :-1]).astype(jnp.float32)))
        ent_sp = obj.entropy(kernels.log_softmax(jax.lax.stop_gradient(out.speech_logits[:, :-1]).astype(jnp.float32)))
        ent = jnp.where(lp["speech_mask"], ent_sp.sum(-1), ent_text)
        aux = {"rl/pg_loss": loss, "rl/clip_fraction": obj.masked_mean(clipped, mask),
               "rl/ratio_mean": obj.masked_mean(ratio, mask), "rl/entropy": obj.masked_mean(ent, mask),
               "rl/kl_ref": obj.masked_mean(kl, mask) if c.kl_coef > 0 else jnp.float32(0.0)}
        return loss, aux

    def update(params, rest, opt_state, batch, mask, sampler, old, ref, adv):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch, mask, sampler, old,
                                                                        ref, adv)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**aux, "rl/loss": loss, "rl/grad_norm": optax.global_norm(grads)}

    return jax.jit(update)


def learn(update, params, rest, opt_state, p: Prepared, c: RLConfig):
    """``rl.ppo_epochs`` full-batch updates on one prepared batch → (params, opt_state,
    metrics of the first epoch plus the last epoch's clip fraction and seconds)."""
    args = [jnp.asarray(x) for x in (p.mask, p.sampler, p.old, p.ref, p.advantages)]
    t0 = time.perf_counter()
    first = None
    for _ in range(c.ppo_epochs):
        params, opt_state, m = update(params, rest, opt_state, p.batch, *args)
        first = first or m
    metrics = {k: float(v) for k, v in first.items()}
    metrics["rl/clip_fraction_last_epoch"] = float(m["rl/clip_fraction"])
    jax.block_until_ready(params)
    metrics["time/learn_s"] = time.perf_counter() - t0
    return params, opt_state, metrics


__all__ = ["Prepared", "advantages_of", "learn", "make_update", "optimizer_for", "prepare"]
