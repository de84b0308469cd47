"""Choosing a token (or a speech frame's 80 bins) from log-probabilities, counter-based.

The random bits of a choice are a function of ``(session seed, micro-turn, position,
stream)`` only: a Philox-4x64 generator (numpy's, counter-based) keyed by the seed, whose
counter is ``[0, micro_turn, position, stream]`` (the draws advance word 0 only, so two
choices never share bits). A session therefore samples the same tokens whatever it is
batched with, and replaying it from its seed reproduces it exactly. The choice itself is
made on the host, one session at a time, in float64 numpy from the float32 log-probs the
engine reported, so nothing in it depends on the batch either.

Filters, applied in this order to the temperature-scaled log-probs (``x = logp / T``),
each keeping at least the most likely allowed value:

* ``temperature == 0``: greedy (argmax; ties go to the lowest id), no random bits drawn;
* ``top_k > 0``: the k largest;
* ``top_p < 1``: the smallest set, in order of decreasing probability, whose probability
  reaches ``top_p``;
* ``min_p > 0``: values whose probability is at least ``min_p`` times the largest.

Then one Gumbel-max draw over the survivors (``argmax(x + g)``, ``g = -log(-log u)``):
an exact sample of the filtered, renormalised distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STREAM_TOKEN = 0    # a text/control token
STREAM_SPEECH = 1   # a speech frame's 80 per-channel bins


@dataclass(frozen=True)
class SamplingParams:
    """How a session samples (engine default, or per session at ``open``)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def validate(self) -> "SamplingParams":
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1] (1 = off)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} must lie in [0, 1] (0 = off)")
        return self


GREEDY = SamplingParams(temperature=0.0)


def uniforms(seed: int, micro_turn: int, position: int, stream: int, shape) -> np.ndarray:
    """float64 ``shape`` uniforms in [0, 1), a pure function of the four counters."""
    bitgen = np.random.Philox(key=int(seed) % (1 << 64), counter=[0, int(micro_turn), int(position), int(stream)])
    return np.random.Generator(bitgen).random(shape)


def choose(logp: np.ndarray, params: SamplingParams, u: np.ndarray | None, allowed: np.ndarray | None = None) -> np.ndarray:
    """Pick one index along the last axis of logp [..., n] (float32 log-probs).

    allowed: bool [..., n] or None (every value allowed; at least one must be). u: the
    uniforms [..., n] (unused when greedy). Returns int64 [...]."""
    x = np.asarray(logp, np.float64)
    if allowed is not None:
        x = np.where(allowed, x, -np.inf)
    if params.temperature == 0:
        return np.argmax(x, axis=-1)
    x = x / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = -np.partition(-x, params.top_k - 1, axis=-1)[..., params.top_k - 1:params.top_k]
        x = np.where(x >= kth, x, -np.inf)
    if params.top_p < 1 or params.min_p > 0:
        m = np.max(x, axis=-1, keepdims=True)
        p = np.exp(x - m)
        p /= p.sum(-1, keepdims=True)
        if params.top_p < 1:
            order = np.argsort(-p, axis=-1, kind="stable")
            ps = np.take_along_axis(p, order, -1)
            before = np.cumsum(ps, -1) - ps           # mass of the more likely values
            keep_sorted = before < params.top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            x = np.where(keep, x, -np.inf)
        if params.min_p > 0:
            x = np.where(p >= params.min_p * p.max(-1, keepdims=True), x, -np.inf)
    g = -np.log(-np.log(np.clip(u, 1e-300, 1.0 - 1e-16)))
    return np.argmax(x + g, axis=-1)
