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


def token_logprobs(out: Outputs, batch: dict) -> dict:
    """Log-probability of each next target under the model: text/control [B, L-1] and
    speech [B, L-1] (summed over mel channels), with the masks. The sampler reports the
    same numbers for the tokens it samples."""
    t = next_token_targets(batch)
    lp_text = kernels.log_softmax(out.text_logits[:, :-1].astype(jnp.float32))
    tok_lp = jnp.take_along_axis(lp_text, t["tokens"][..., None], axis=-1)[..., 0]
    lp_sp = kernels.log_softmax(out.speech_logits[:, :-1].astype(jnp.float32))
    sp_lp = jnp.take_along_axis(lp_sp, t["dmel"][..., None], axis=-1)[..., 0]  # [B, L-1, n_mels]
    return {"token": tok_lp, "speech": sp_lp, "text_mask": t["text"],
            "speech_mask": t["speech"], "control_mask": t["control"]}


def losses(out: Outputs, batch: dict, weights: LossWeights = LossWeights()) -> tuple[jax.Array, dict]:
    """Total loss and metrics (per-kind loss and target counts)."""
    lp = token_logprobs(out, batch)

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
