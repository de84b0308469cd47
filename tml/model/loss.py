"""Losses per output kind: text, speech frames, control tokens (next-token prediction).

The logits at position *i* predict the content of position *i + 1* within the same
segment. ``loss_kind[i + 1]`` (from the stream layout) says which loss applies: TEXT and
CONTROL use the text head over the whole vocabulary, SPEECH the dMel head (80 parallel
16-way classifications, averaged over channels). Each kind's loss is the mean over its
target positions; the total is their weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from tml import kernels
from tml.model.model import Outputs
from tml.stream.layout import LossKind


@dataclass
class LossWeights:
    text: float = 1.0
    speech: float = 1.0
    control: float = 1.0


def next_token_targets(batch: dict) -> dict:
    """Shifted targets and masks: each [B, L-1] (speech bins [B, L-1, n_mels])."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    kind = batch["loss_kind"][:, 1:].astype(jnp.int32)
    return {
        "tokens": batch["tokens"][:, 1:],
        "dmel": batch["dmel"][:, 1:].astype(jnp.int32),
        "text": same & (kind == LossKind.TEXT),
        "speech": same & (kind == LossKind.SPEECH),
        "control": same & (kind == LossKind.CONTROL),
    }


def chunked_text_logprobs(hidden: jax.Array, head_w: jax.Array, tokens: jax.Array, chunk: int) -> jax.Array:
    """Log-probability of each next text token, the vocabulary projection computed
    ``chunk`` positions at a time: hidden [B, L, d] (the final-normed state,
    ``Outputs.hidden``), head_w [d, V] (``text_head.w``), tokens [B, L] → [B, L-1].

    The same numbers as :func:`token_logprobs` from the text head's logits, without their
    [B, L, V] array: a ``lax.map`` over the L/chunk position chunks, each chunk's
    projection, log-softmax and target pick rematerialised (``jax.checkpoint``) in the
    backward pass, so one chunk's [B, chunk, V] logits (and their gradient) are alive at a
    time. In ``batch_invariant`` mode every row's logits, log-probabilities and input
    gradient are row-invariant, so the values and the gradient of ``hidden`` (hence of
    every parameter below the head) have the unchunked bits; the head weight's gradient
    is summed chunk by chunk (in float32, each chunk's rounded to the weight's dtype),
    another association of the same products: close, not bitwise.
    """
    B, L, _ = hidden.shape
    if L % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the row length {L}")
    n = L // chunk
    w32 = head_w.astype(jnp.float32)  # the chunks' weight gradients add up in float32
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # the last position's target unused

    @jax.checkpoint
    def one(xs):
        h, t = xs                                                      # [B, chunk, d], [B, chunk]
        logits = kernels.linear(h, w32.astype(head_w.dtype).astype(h.dtype))   # as text_head(h)
        lp = kernels.log_softmax(logits.astype(jnp.float32))
        return jnp.take_along_axis(lp, t[..., None], axis=-1)[..., 0]

    hs = hidden.reshape(B, n, chunk, hidden.shape[-1]).swapaxes(0, 1)  # [n, B, chunk, d]
    ts = nxt.reshape(B, n, chunk).swapaxes(0, 1)
    lp = jax.lax.map(one, (hs, ts))                                     # [n, B, chunk]
    return lp.swapaxes(0, 1).reshape(B, L)[:, :-1]


def token_logprobs(out: Outputs, batch: dict, *, text_head_w: jax.Array | None = None,
                   chunk: int = 0) -> dict:
    """Log-probability of each next target under the model: text/control [B, L-1] and
    speech [B, L-1] (summed over mel channels), with the masks. The sampler reports the
    same numbers for the tokens it samples. ``chunk`` > 0 (with ``text_head_w``, the text
    head's weight): the text log-probabilities from ``out.hidden`` by
    :func:`chunked_text_logprobs` (``out.text_logits`` then unused)."""
    t = next_token_targets(batch)
    if chunk:
        if text_head_w is None:
            raise ValueError("a chunked text loss needs the text head's weight (text_head_w=)")
        tok_lp = chunked_text_logprobs(out.hidden, text_head_w, batch["tokens"], chunk)
    else:
        lp_text = kernels.log_softmax(out.text_logits[:, :-1].astype(jnp.float32))
        tok_lp = jnp.take_along_axis(lp_text, t["tokens"][..., None], axis=-1)[..., 0]
    lp_sp = kernels.log_softmax(out.speech_logits[:, :-1].astype(jnp.float32))
    sp_lp = jnp.take_along_axis(lp_sp, t["dmel"][..., None], axis=-1)[..., 0]  # [B, L-1, n_mels]
    return {"token": tok_lp, "speech": sp_lp, "text_mask": t["text"],
            "speech_mask": t["speech"], "control_mask": t["control"]}


def losses(out: Outputs, batch: dict, weights: LossWeights = LossWeights(), *,
           text_head_w: jax.Array | None = None, chunk: int = 0) -> tuple[jax.Array, dict]:
    """Total loss and metrics (per-kind loss and target counts); ``chunk`` / ``text_head_w``:
    the text log-probabilities in position chunks (:func:`token_logprobs`)."""
    lp = token_logprobs(out, batch, text_head_w=text_head_w, chunk=chunk)

    def masked_mean(x, m):
        n = m.sum()
        return -(jnp.where(m, x, 0.0).sum() / jnp.maximum(n, 1)), n

    text, n_text = masked_mean(lp["token"], lp["text_mask"])
    control, n_ctrl = masked_mean(lp["token"], lp["control_mask"])
    speech, n_sp = masked_mean(lp["speech"].mean(-1), lp["speech_mask"])
    total = weights.text * text + weights.speech * speech + weights.control * control
    metrics = {"loss": total, "loss_text": text, "loss_speech": speech, "loss_control": control,
               "n_text": n_text, "n_speech": n_sp, "n_control": n_ctrl}
    return total, metrics
