"""The trainer's side of the alignment contract: :func:`score` recomputes the
log-probability of every output of finished sessions.

Each session is laid out by :func:`tml.stream.layout` as **one row, never cut** (a
session longer than the training row length is scored whole: cutting it would restart
positions and change the context the sampler saw), padded with segment 0 to a length
bucket (a multiple of the attention split size), and run through the model's full-row
call ``model(batch)`` — the training program — then :func:`tml.model.loss.token_logprobs`.
In ``batch_invariant`` mode the results equal, bit for bit, the log-probs the engine
reported (``tests/sampler/test_alignment.py``).

:func:`speech_frame_logprob` is the one sum over a frame's 80 channel log-probs, used by
the engine and by :func:`score` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tml import kernels
from tml.model.loss import token_logprobs
from tml.stream import LossKind, MicroTurn, Tokens, layout
from tml.text import ByteTokenizer, Tokenizer

_frame_sum = jax.jit(lambda x: kernels.pairwise_sum(x, -1))


def speech_frame_logprob(channels: np.ndarray) -> np.ndarray:
    """float32 [..., 80] per-channel log-probs → [...] their sum, in the canonical
    pairwise order (:func:`tml.kernels.pairwise_sum`)."""
    return np.asarray(_frame_sum(jnp.asarray(channels, jnp.float32)))


@dataclass
class ScoredSession:
    """Log-probabilities of one session's row, indexed by position (slot) ``p``: the
    model's probability of position p's content given positions < p (position 0: NaN).

    tokens [L]; loss_kind [L] (:class:`tml.stream.LossKind`: which value applies);
    token_logprobs float32 [L] (text and control tokens); speech_channel_logprobs
    float32 [L, 80]; speech_logprobs float32 [L] their sum (speech positions)."""

    tokens: np.ndarray
    loss_kind: np.ndarray
    token_logprobs: np.ndarray
    speech_channel_logprobs: np.ndarray
    speech_logprobs: np.ndarray


def row_bucket(n: int) -> int:
    """Row length for n tokens: a power-of-two multiple of the split size (few compiled shapes)."""
    size = kernels.SPLIT_SIZE
    while size < n:
        size *= 2
    return size


def pad_rows(seqs: list[Tokens], length: int | None = None) -> dict:
    """Laid-out sessions → the padded batch :func:`score` runs (and a learner must take its
    gradient through, to run the program that produced the log-probs): every field
    [B, L] (``dmel`` [B, L, ...]) padded to ``L = row_bucket(longest)`` (or ``length``,
    one shape for every call: e.g. an RL run's fixed row) with segment 0,
    ``patches`` uint8 [B, Np, ...] padded to the next power of two ``Np`` of the most
    patches (at least 1); jax arrays."""
    longest = max(len(s) for s in seqs)
    if length is not None and longest > length:
        raise ValueError(f"a session of {longest} tokens does not fit rows of length={length}")
    L = row_bucket(longest) if length is None else length
    Np = 1 << (max(1, max(len(s.patches) for s in seqs)) - 1).bit_length()  # a power of two
    out = {}
    for name, fill in (("tokens", 0), ("modality", 0), ("positions", 0), ("segment_ids", 0), ("micro_turn", 0),
                       ("loss_kind", 0), ("dmel", 0), ("patch_index", -1)):
        rows = []
        for s in seqs:
            a = getattr(s, name)
            pad = np.full((L - len(a), *a.shape[1:]), fill, a.dtype)
            rows.append(np.concatenate([a, pad]))
        out[name] = np.stack(rows)
    out["patches"] = np.stack([np.concatenate([s.patches, np.zeros((Np - len(s.patches), *s.patches.shape[1:]),
                                                                    np.uint8)]) for s in seqs])
    return {k: jnp.asarray(v) for k, v in out.items()}


@nnx.jit
def _score_rows(model, batch):
    lp = token_logprobs(model(batch), batch)
    return lp["token"], lp["speech"]


def score(model, sessions: list[list[MicroTurn]], *, tokenizer: Tokenizer = ByteTokenizer(),
          batch_size: int = 8, length: int | None = None) -> list[ScoredSession]:
    """Score finished sessions (each a list of committed micro-turns, e.g. ``engine.turns(sid)``).

    model: an :class:`tml.model.InteractionModel`, or ``(graphdef, state)`` from
    ``nnx.split``. Sessions are batched ``batch_size`` rows at a time (the bits of a row
    do not depend on the others in ``batch_invariant`` mode), each batch padded by
    :func:`pad_rows` (``length``: a fixed row length, one compiled shape)."""
    if not isinstance(model, nnx.Module):
        model = nnx.merge(*model)
    seqs = [layout(turns, tokenizer) for turns in sessions]
    out: list[ScoredSession] = []
    for i in range(0, len(seqs), batch_size):
        group = seqs[i:i + batch_size]
        tok, sp = _score_rows(model, pad_rows(group, length))
        frames = speech_frame_logprob(sp)  # on the padded batch: one shape per batch, not one per session length
        tok, sp = np.asarray(tok), np.asarray(sp)
        for r, s in enumerate(group):
            L = len(s)
            t = np.full(L, np.nan, np.float32)
            t[1:] = tok[r, :L - 1]
            c = np.full((L, sp.shape[-1]), np.nan, np.float32)
            c[1:] = sp[r, :L - 1]
            f = np.full(L, np.nan, np.float32)
            f[1:] = frames[r, :L - 1]
            out.append(ScoredSession(s.tokens, s.loss_kind, t, c, f))
    return out


def trainer_logprobs(outputs, scored: ScoredSession) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A session's sampled tokens (its engine outputs, :class:`tml.sampler.TurnOutput` s
    with ``positions`` and ``logprobs``) read against its :func:`score` row → (sampler
    log-probs float32 [N], trainer log-probs float32 [N], row slots int64 [N], loss kinds
    [N]). The trainer's value at a speech slot is the frame's sum over its 80 channels
    (``ScoredSession.speech_logprobs``), as the sampler reports it; the one read the
    divergence inspector and the RL learner make."""
    pos = np.concatenate([o.positions for o in outputs]).astype(np.int64)
    kind = scored.loss_kind[pos]
    trainer = np.where(kind == LossKind.SPEECH, scored.speech_logprobs[pos], scored.token_logprobs[pos])
    sampler = np.concatenate([o.logprobs for o in outputs])
    return sampler.astype(np.float32), trainer.astype(np.float32), pos, kind
