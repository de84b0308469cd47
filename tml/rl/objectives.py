"""RL objectives, pure ``jnp`` (no model, no host code): group baselines, PPO-clip, the
k3 KL to a frozen reference, truncated importance sampling, entropy.

Shapes: ``S`` scenarios (groups) × ``G`` episodes each; ``B = S * G`` episodes laid out
as rows of ``T`` token slots; a ``mask`` float/bool [B, T] marks the model's sampled
output tokens (text bytes, control tokens, ``<end>``, speech frames). A speech frame is
one action whose log-prob is the sum over its 80 channels (as the sampler reports it).

The formulas follow google-tunix (``tunix/rl/algo_core.py``: ``compute_advantages``,
``compute_drgrpo_advantages``, ``grpo_loss_fn``; ``tunix/rl/common.py``:
``compute_kl_divergence(method="low_var_kl")``, ``aggregate_loss``), written again here
over our masks because tunix's learner expects prompt/completion token pairs, and our
rows interleave inputs and outputs micro-turn by micro-turn. One difference, measured
on G = 2: tunix's GRPO std uses ``ddof=1``; we use the population std (``ddof=0``,
DeepSeekMath's formula and TRL's), so a group of two gets advantages ±1 exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADVANTAGES = ("grpo", "drgrpo")
STD_EPS = 1e-6


def group_advantages(rewards: jax.Array, *, estimator: str = "grpo", std_normalize: bool = True) -> jax.Array:
    """rewards float [S, G] → advantages [S, G].

    ``grpo``: ``r - mean_g(r)``, divided by ``std_g(r) + 1e-6`` when ``std_normalize``
    (a group whose rewards are all equal gets 0). ``drgrpo`` (Dr. GRPO, Liu et al. 2025):
    ``r - mean_g(r)``, never divided by the std (``std_normalize`` is ignored), and the
    loss is aggregated with a constant normaliser (:func:`aggregate`, ``"seq_sum_const"``)."""
    if estimator not in ADVANTAGES:
        raise ValueError(f"advantage estimator {estimator!r}: choose one of {ADVANTAGES}")
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [S groups, G episodes], got shape {r.shape}")
    a = r - r.mean(axis=1, keepdims=True)
    if estimator == "grpo" and std_normalize:
        a = a / (r.std(axis=1, keepdims=True) + STD_EPS)
    return a


def ppo_clip(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
             eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO-clip per token: logp / old_logp float [B, T] (current and behaviour policy),
    advantages [B] or [B, T] → (per-token loss [B, T], ratio [B, T], clipped bool [B, T]).

    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = exp(logp - old_logp)``;
    ``clipped`` marks tokens where the clipped term is the larger (its gradient is 0).
    Masked-out tokens give 0 loss and are never counted as clipped."""
    m = jnp.asarray(mask, bool)
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    ratio = jnp.exp(jnp.where(m, logp - old_logp, 0.0))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.where(m, jnp.maximum(unclipped, clipped), 0.0)
    return loss, ratio, m & (clipped > unclipped)


def kl_k3(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token [B, T], from tokens sampled by
    pi: ``exp(d) - d - 1`` with ``d = ref_logp - logp`` (>= 0; 0 on masked-out tokens)."""
    d = jnp.where(jnp.asarray(mask, bool), ref_logp - logp, 0.0)
    return jnp.expm1(d) - d


def truncated_is_weights(trainer_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array,
                         cap: float) -> jax.Array:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): per-token weights ``min(pi_trainer / pi_sampler, cap)``
    [B, T], gradient-free, 1 on masked-out tokens. Aligned (bitwise equal) log-probs give
    exactly 1.0."""
    if not cap > 0:
        raise ValueError(f"the truncated-IS cap must be > 0, got {cap}")
    d = jnp.where(jnp.asarray(mask, bool), trainer_logp - sampler_logp, 0.0)
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(d), cap))


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_const")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "token_mean", *,
              constant: float = 1.0) -> jax.Array:
    """Per-token values [B, T] → a scalar. ``token_mean``: sum / number of masked tokens
    (DAPO); ``seq_mean_token_mean``: each row's token mean, averaged over non-empty rows
    (the GRPO paper); ``seq_sum_const``: sum / (B * ``constant``), a normaliser that
    depends on no length (Dr. GRPO; ``constant`` = the generation budget)."""
    m = jnp.asarray(mask, jnp.float32)
    x = jnp.where(m > 0, per_token, 0.0)
    if mode == "token_mean":
        return x.sum() / jnp.maximum(m.sum(), 1.0)
    if mode == "seq_mean_token_mean":
        n = m.sum(axis=1)
        rows = x.sum(axis=1) / jnp.maximum(n, 1.0)
        return rows.sum() / jnp.maximum((n > 0).sum(), 1)
    if mode == "seq_sum_const":
        return x.sum() / (x.shape[0] * constant)
    raise ValueError(f"loss aggregation {mode!r}: choose one of {AGGREGATIONS}")


def aggregation_weights(mask, mode: str = "token_mean", *, constant: float = 1.0):
    """:func:`aggregate` as per-token weights (numpy float32 [B, T]): ``sum(w * x)`` is
    ``aggregate(x, mask, mode)`` (up to rounding), and, being linear, it splits over any
    rows — the learner sums it over micro-batches of rows (gradient accumulation)."""
    import numpy as np

    m = (np.asarray(mask) > 0).astype(np.float32)
    if mode == "token_mean":
        return m / np.float32(max(m.sum(), 1.0))
    if mode == "seq_mean_token_mean":
        n = m.sum(axis=1, keepdims=True)
        return (m / np.maximum(n, 1.0) / np.float32(max((n > 0).sum(), 1))).astype(np.float32)
    if mode == "seq_sum_const":
        return m / np.float32(m.shape[0] * constant)
    raise ValueError(f"loss aggregation {mode!r}: choose one of {AGGREGATIONS}")


def entropy(logp: jax.Array) -> jax.Array:
    """Entropy of each distribution over the last axis, from its log-probs [..., V] → [...]."""
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    m = jnp.asarray(mask, jnp.float32)
    return jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(m.sum(), 1.0)


__all__ = ["ADVANTAGES", "AGGREGATIONS", "aggregate", "aggregation_weights", "entropy", "group_advantages", "kl_k3", "masked_mean",
           "ppo_clip", "truncated_is_weights"]
