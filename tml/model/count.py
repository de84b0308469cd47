"""Parameter counts — total and active per token — without allocating (``nnx.eval_shape``),
and the model FLOPs of a training step (the MFU numerator)."""

from __future__ import annotations

import itertools
import math

import jax
from flax import nnx

from tml.model.config import ModelConfig


def abstract_model(cfg: ModelConfig):
    from tml.model.model import InteractionModel

    return nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> dict:
    """{'total', 'active', 'routed_expert', 'per_component'}; active = total minus the
    routed experts a token does not use (n_experts - top_k of each MoE layer)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    per: dict[str, int] = {}
    routed = 0
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        top = str(getattr(path[0], "key", path[0]))
        n = math.prod(var.shape)
        per[top] = per.get(top, 0) + n
        axes = var.get_metadata().get("logical_axes") or ()
        if len(axes) == 3 and axes[0] == "experts":  # routed expert weights [E, ., .]
            routed += n
    total = sum(per.values())
    moe_layers = cfg.resolved_mlp_types().count("moe")
    inactive = routed * (cfg.n_experts - cfg.top_k) // cfg.n_experts if moe_layers else 0
    return {"total": total, "active": total - inactive, "routed_expert": routed, "per_component": per}


def format_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# --------------------------------------------------------------------------- FLOPs


def attention_pairs(row_length: int, window: int | None = None) -> int:
    """(query, key) pairs one causal attention layer scores in a row of ``row_length``:
    query ``p`` sees ``min(p + 1, window)`` keys, so ``L (L + 1) / 2`` for a full layer and
    ``w (w + 1) / 2 + (L - w) w`` for a sliding window ``w < L``."""
    L = int(row_length)
    if not window or window >= L:
        return L * (L + 1) // 2
    w = int(window)
    return w * (w + 1) // 2 + (L - w) * w


def token_matmul_params(cfg: ModelConfig) -> dict:
    """Weights every token multiplies (one multiply-add each) in the forward pass, by part:

    * ``attention``: q, k, v, o projections of every layer;
    * ``mlp``: dense SwiGLU layers (3 d d_ff); MoE layers: router (d E), the ``top_k``
      routed experts a token uses and the shared experts (3 d d_expert each);
    * ``heads``: text (d V) and dMel (d n_mels n_bins) heads — both run on every position.

    Not counted (no matmul in the model's definition): the token, modality and dMel
    *embeddings* (lookups; the dMel sum of n_mels rows is computed as a one-hot matmul,
    an implementation choice: hardware, not model, FLOPs), norm scales (elementwise),
    and the hMLP (it runs once per video patch: :func:`hmlp_flops_per_patch`)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = cfg.n_layers * d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 0
    for kind in cfg.resolved_mlp_types():
        if kind == "dense":
            mlp += 3 * d * cfg.d_ff
        else:
            mlp += d * cfg.n_experts + 3 * d * cfg.d_expert * (cfg.top_k + cfg.n_shared_experts)
    heads = d * (cfg.vocab_size + cfg.n_mels * cfg.n_bins)
    return {"attention": attn, "mlp": mlp, "heads": heads}


def hmlp_flops_per_patch(cfg: ModelConfig) -> int:
    """Forward FLOPs of the hMLP encoder for one video patch (``temporal_patch_size`` x
    ``patch_size``^2 x ``n_channels`` pixels → one d_model token): layer ``i`` is a
    ``[d_in, d_out]`` projection applied at each of the ``t h w`` grid positions left after
    its fold, ``2 d_in d_out t h w`` FLOPs (norms and GELU not counted)."""
    from tml.model.frontends import plan_out_scales

    scales = plan_out_scales(cfg.temporal_patch_size, cfg.patch_size, cfg.vision_layers, cfg.n_channels)
    total = 0
    for i, (a, b) in enumerate(itertools.pairwise(scales)):
        fold = int((b[0] // a[0]) * (b[1] // a[1]) * (b[2] // a[2]))
        d_in = int(a[3]) * fold
        d_out = cfg.d_model if i == cfg.vision_layers - 1 else int(b[3])
        positions = ((cfg.temporal_patch_size // int(b[0])) * (cfg.patch_size // int(b[1]))
                     * (cfg.patch_size // int(b[2])))
        total += 2 * d_in * d_out * positions
    return total


def forward_flops(cfg: ModelConfig, *, rows: int, row_length: int, patches_per_row: int) -> dict:
    """Model FLOPs of one forward pass over ``rows`` packed rows of ``row_length`` tokens
    and ``patches_per_row`` video patch slots each, by part (see :func:`train_step_flops`)."""
    tokens = rows * row_length
    mm = token_matmul_params(cfg)
    per_pair = 2 * 2 * cfg.head_dim * cfg.n_heads        # q.k and p.v, one multiply-add each
    scores = sum(attention_pairs(row_length, cfg.sliding_window if lt == "sliding" else None)
                 for lt in cfg.resolved_layer_types())
    out = {
        "backbone": 2 * (mm["attention"] + mm["mlp"]) * tokens,
        "attention_scores": per_pair * scores * rows,
        "heads": 2 * mm["heads"] * tokens,
        "hmlp": hmlp_flops_per_patch(cfg) * patches_per_row * rows,
    }
    out["total"] = sum(out.values())
    return out


def train_step_flops(cfg: ModelConfig, *, rows: int, row_length: int, patches_per_row: int) -> int:
    """Model FLOPs of one training step (forward + backward = 3 x forward) over ``rows``
    packed rows (the global batch, all micro-batches) of ``row_length`` positions with
    ``patches_per_row`` video patch slots each — the numerator of MFU::

        3 * (  2 * N_tok * rows * L                              backbone + heads
             + 4 * n_heads * head_dim * rows * sum_layers pairs(L, window)   attention
             + F_patch * rows * patches_per_row )                hMLP

    * ``N_tok`` (:func:`token_matmul_params`): the matmul weights one token uses — the
      attention projections, dense / active MoE (top_k routed + shared + router) MLPs and
      the text and dMel heads; embedding lookups and norms are free;
    * ``pairs(L, w)`` (:func:`attention_pairs`): the (query, key) pairs the causal mask lets
      through, ``L (L + 1) / 2`` for a full layer, ``~ L w`` for a sliding layer. **Causal
      attention is counted as the visible half** (MaxText's / FlashAttention's convention;
      PaLM's ``6N + 12 n_layers H Q T`` counts the full ``L^2`` square, twice this). Rows
      are scored as whole causal rows: the packing's segment mask is not subtracted;
    * ``F_patch`` (:func:`hmlp_flops_per_patch`): the hMLP per patch slot. The encoder runs
      on every slot of the ``[rows, patches_per_row]`` patch array, so pass the loader's
      ``max_patches_per_row`` (as every position of a row counts, padding included).

    Unlike ``6 * count_params(cfg)['active'] * tokens``, the hMLP is charged per patch
    (not per token: its weights dominate ``tiny``'s parameters), embeddings are not
    charged, and attention scores are."""
    f = forward_flops(cfg, rows=rows, row_length=row_length, patches_per_row=patches_per_row)
    return 3 * f["total"]
