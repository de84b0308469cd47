"""Trainer–sampler drift metrics: one implementation, pure numpy (``tml divergence``, the
notebook and RL all call it).

Inputs are the log-probabilities the **sampler** reported for the tokens it sampled
(``TurnOutput.logprobs``) and the ones the **trainer** computed for the same tokens
(:func:`tml.sampler.score`), float32 ``[N]`` each. With ``d = trainer - sampler``
(computed in float64 from the float32 values) the importance ratio of a token is

    r = exp(d) = pi_trainer(token) / pi_sampler(token)

— the factor an off-policy RL loss multiplies a sampled token's gradient by, to correct
for having sampled it from the sampler's distribution instead of the trainer's.

=====================================  =====================================================
``mismatch/bitwise_equal_fraction``    tokens whose float32 log-prob bits are equal / N
``mismatch/logprob_abs_diff_max``      max |d|
``mismatch/logprob_abs_diff_mean``     mean |d|
``mismatch/kl_k3``                     mean of ``r - log r - 1`` (= ``expm1(d) - d``, no
                                       cancellation for small d): Schulman's k3 estimator of
                                       **KL(pi_sampler || pi_trainer)** from tokens drawn by
                                       the sampler (E_sampler[r] = 1, so E[r - 1 - log r] is
                                       that KL); >= 0 token by token
``mismatch/is_ratio_min/_mean/_max``   min / mean / max of r
``mismatch/ess``                       normalised effective sample size of the ratios,
                                       ``(sum r)^2 / (N * sum r^2)`` in (0, 1]: 1 when every
                                       ratio is equal, 1/N when one token carries all weight
=====================================  =====================================================

Aligned input (every pair bitwise equal) gives **exactly** 1, 0, 0, 0, 1, 1, 1, 1: d is
0.0, exp(0) = 1.0 and expm1(0) = 0.0 exactly, and N^2 / (N * N) = 1.0
(``tests/sampler/test_divergence.py`` checks it with ``==``).

:func:`first_divergence` is the first token of a session whose bits differ (its index in
the sampled tokens and its slot in the session's row); :func:`session_drift` puts both
beside a session's own metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METRICS: tuple[str, ...] = (
    "mismatch/bitwise_equal_fraction",
    "mismatch/logprob_abs_diff_max",
    "mismatch/logprob_abs_diff_mean",
    "mismatch/kl_k3",
    "mismatch/is_ratio_min",
    "mismatch/is_ratio_mean",
    "mismatch/is_ratio_max",
    "mismatch/ess",
)
ALIGNED: dict[str, float] = dict(zip(METRICS, (1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0)))


def _pair(sampler, trainer) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(sampler)
    t = np.asarray(trainer)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"sampler and trainer log-probs must be 1-D arrays of the same tokens, got shapes "
                         f"{s.shape} and {t.shape}: pass one value per sampled token")
    if s.dtype != np.float32 or t.dtype != np.float32:
        raise ValueError(f"log-probs must be float32 (as the sampler and score report them, so bits compare), got "
                         f"{s.dtype} and {t.dtype}")
    for name, a in (("sampler", s), ("trainer", t)):
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(f"{name} log-prob of token {bad[0]} is {a[bad[0]]}: every sampled token needs a finite "
                             "log-prob (was the trainer's row scored at the sampler's positions?)")
    return s, t


def equal_bits(sampler, trainer) -> np.ndarray:
    """bool [N]: the float32 bits of the two log-probs are equal, token by token."""
    s, t = _pair(sampler, trainer)
    return s.view(np.uint32) == t.view(np.uint32)


def drift_metrics(sampler, trainer) -> dict[str, float]:
    """float32 [N] sampler and trainer log-probs of the same N >= 1 tokens → the eight
    ``mismatch/*`` metrics (see the module docstring), as Python floats."""
    s, t = _pair(sampler, trainer)
    if s.size == 0:
        raise ValueError("no tokens to compare: drift metrics need at least one sampled token")
    d = t.astype(np.float64) - s.astype(np.float64)
    r = np.exp(d)
    n = d.size
    values = (
        float(np.count_nonzero(s.view(np.uint32) == t.view(np.uint32)) / n),
        float(np.abs(d).max()),
        float(np.abs(d).mean()),
        float(np.mean(np.expm1(d) - d)),
        float(r.min()),
        float(r.mean()),
        float(r.max()),
        float(r.sum() ** 2 / (n * np.sum(r * r))),
    )
    return dict(zip(METRICS, values))


def first_divergence(sampler, trainer) -> int | None:
    """Index of the first token whose bits differ, or None when all are equal."""
    diff = np.flatnonzero(~equal_bits(sampler, trainer))
    return int(diff[0]) if diff.size else None


@dataclass
class SessionDrift:
    """One session's comparison: ``tokens`` sampled, the first diverging token (its index
    among them and its slot in the session row, None when aligned), and its metrics."""

    tokens: int
    first_diverging_token: int | None
    first_diverging_position: int | None
    metrics: dict[str, float]


def session_drift(sampler, trainer, positions: Sequence[int]) -> SessionDrift:
    """sampler / trainer float32 [N] log-probs of a session's sampled tokens, in order,
    positions int [N] their slots in the session row → :class:`SessionDrift`."""
    positions = np.asarray(positions)
    if positions.shape != np.shape(sampler):
        raise ValueError(f"positions {positions.shape} must give one slot per token {np.shape(sampler)}")
    i = first_divergence(sampler, trainer)
    return SessionDrift(len(positions), i, None if i is None else int(positions[i]), drift_metrics(sampler, trainer))


__all__ = ["ALIGNED", "METRICS", "SessionDrift", "drift_metrics", "equal_bits", "first_divergence", "session_drift"]
