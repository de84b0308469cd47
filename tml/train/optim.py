"""The optimizer: AdamW, linear warm-up then cosine decay, global-norm clipping, and a
weight-decay mask.

The chain applied to the gradients, in order::

    clip_by_global_norm(clip_norm)            # skipped when clip_norm <= 0
    adamw(lr_schedule, b1, b2, eps, weight_decay, mask=decay_mask)

``optax.adamw`` decouples the decay as PyTorch's AdamW does: the update of a decayed
parameter is ``-lr(t) * (adam_direction + weight_decay * param)``, so the decay follows the
learning-rate schedule.

**Learning rate** (:func:`learning_rate_at`, the exact function the optimizer uses, so the
logged value is the applied one). With ``W = warmup_steps``, ``T = total_steps``, peak ``lr``
and floor ``lr * min_lr_ratio``, for the update that produces step ``t + 1`` from step ``t``:

* ``t < W``: ``lr * (t + 1) / W``, a linear ramp that reaches the peak on the last warm-up
  update (the first update is never a wasted update at lr 0);
* ``W <= t < T``: cosine from ``lr`` down to the floor over ``T - W`` updates;
* ``t >= T``: the floor.

``total_steps: 0`` (the default) means the run's length: :meth:`OptimConfig.resolved` turns
it into ``train.steps`` (the trainer resolves it once at start-up, and logs the learning
rate of that resolved schedule). Left unresolved, ``0`` has no cosine: the peak is held
after warm-up.

**Weight-decay mask** (:func:`decay_mask`), decided per parameter from its rank and its
path in the parameter tree (the attribute / dict-key names from the root, for example
``blocks/0/attn/wq/w``):

* parameters of rank < 2 are never decayed: biases, norm scales, scalar gates;
* parameters whose path has a component matching (whole-name, case-insensitive) one of
  ``no_decay_patterns`` are not decayed. The defaults cover norms (any name containing
  ``norm``), biases, scales, and embedding tables (``embed``, ``embedding(s)``, ``*_embed``,
  ``*_embedding``, ``*_emb``, ``wte``, ``wpe``, ``table``, ``*_table``);
* everything else of rank >= 2 is decayed: dense/attention kernels, MoE expert weights
  ``[E, d, f]``, routers, and output heads (``text_head``, ``unembed``: a *head* is a
  projection, not a lookup table, and is decayed unless it is tied to an embedding).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from tml.train.tree_paths import path_names, path_str
from tml.train.config import DEFAULT_NO_DECAY_PATTERNS, OptimConfig  # noqa: F401  (re-exported)

def validate(cfg: OptimConfig) -> None:
    """Raise ``ValueError`` naming the offending ``optim.*`` field."""
    problems = []
    if not cfg.lr > 0:
        problems.append(f"optim.lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0:
        problems.append(f"optim.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.total_steps and cfg.total_steps <= cfg.warmup_steps:
        problems.append(f"optim.total_steps ({cfg.total_steps}) must be > optim.warmup_steps "
                        f"({cfg.warmup_steps}), or 0 (= train.steps)")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        problems.append(f"optim.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not (0.0 <= cfg.b1 < 1.0 and 0.0 <= cfg.b2 < 1.0):
        problems.append(f"optim.b1 and optim.b2 must be in [0, 1), got {cfg.b1}, {cfg.b2}")
    if cfg.weight_decay < 0:
        problems.append(f"optim.weight_decay must be >= 0, got {cfg.weight_decay}")
    for p in cfg.no_decay_patterns:
        try:
            re.compile(p)
        except re.error as e:
            problems.append(f"optim.no_decay_patterns: {p!r} is not a regular expression ({e})")
    if problems:
        raise ValueError("invalid optimizer config: " + "; ".join(problems))


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """``step`` (int scalar, the optimizer's update count) → learning rate (float32 scalar)."""
    validate(cfg)
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warm, total = cfg.warmup_steps, cfg.total_steps

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        ramp = peak * (t + 1.0) / max(warm, 1)
        if not total:               # unresolved 0: no cosine, the peak after warm-up
            return jnp.where(t < warm, ramp, jnp.float32(peak))
        progress = jnp.clip((t - warm) / (total - warm), 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < warm, ramp, cosine)

    return schedule


def learning_rate_at(cfg: OptimConfig, step: int) -> float:
    """The learning rate the optimizer applies in update number ``step`` (for logging)."""
    return float(lr_schedule(cfg)(step))


def param_path(path: Sequence[Any]) -> str:
    """Key path → ``"blocks/0/attn/wq/w"``."""
    return path_str(path)


def should_decay(path: Sequence[Any] | str, ndim: int,
                 no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS) -> bool:
    """The rule of the module docstring for one parameter (path as key path or "a/b/c")."""
    if ndim < 2:
        return False
    names = path.split("/") if isinstance(path, str) else path_names(path)
    compiled = [re.compile(p, re.IGNORECASE) for p in no_decay_patterns]
    return not any(c.fullmatch(n) for n in names for c in compiled)


def decay_mask(params: Any, no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS) -> Any:
    """A tree of bools shaped like ``params``: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: should_decay(path, jnp.ndim(x), no_decay_patterns), params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The full update rule of the module docstring; works on any parameter pytree
    (``nnx.State`` of ``nnx.Param``, nested dicts, ...)."""
    validate(cfg)
    patterns = tuple(cfg.no_decay_patterns)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(
        lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=lambda params: decay_mask(params, patterns),
    ))
    return optax.chain(*parts)


def describe_decay(params: Any, no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS
                   ) -> dict[str, bool]:
    """``{"blocks/0/attn/wq/w": True, ...}``: which parameters are decayed (for a start-up
    log line, so the mask is visible rather than assumed)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {param_path(p): should_decay(p, jnp.ndim(x), no_decay_patterns) for p, x in leaves}


__all__ = [
    "OptimConfig", "make_optimizer", "lr_schedule", "learning_rate_at", "decay_mask",
    "should_decay", "describe_decay", "param_path", "validate", "DEFAULT_NO_DECAY_PATTERNS",
]
