"""Model FLOPs of a training step (the MFU numerator): a hand-computed toy config, the hMLP
charged per patch (not per token), and the count checked against every matmul of the
model's traced forward (``jax.make_jaxpr``: no compile, no allocation)."""

import math

import jax
import jax.extend
import pytest
from flax import nnx

from tml import kernels
from tml.model.config import ModelConfig
from tml.model.count import (
    abstract_model,
    attention_pairs,
    count_params,
    forward_flops,
    hmlp_flops_per_patch,
    train_step_flops,
)

# d=8, 2 layers (sliding window 3, then full), GQA 2:1 heads of 4, one dense and one MoE layer
# (4 experts, top-2, 1 shared), hMLP of 2 layers over 2x4x4x3 patches.
TOY = ModelConfig(name="toy", d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16,
                  sliding_window=3, layer_types=["sliding", "full"], n_experts=4, n_shared_experts=1,
                  top_k=2, d_expert=8, n_dense_layers=1, patch_size=4, vision_layers=2)


def test_attention_pairs_count_the_causal_half_and_the_window():
    assert attention_pairs(6) == 1 + 2 + 3 + 4 + 5 + 6
    assert attention_pairs(6, 3) == 1 + 2 + 3 + 3 + 3 + 3
    assert attention_pairs(6, 6) == attention_pairs(6, 10) == attention_pairs(6)


def test_toy_config_by_hand():
    V, d = TOY.vocab_size, 8
    attn_proj = 2 * d * 4 * (2 * 2 + 2 * 1)                    # wq, wo: 2 heads; wk, wv: 1 kv head
    dense = 3 * d * 16
    moe = d * 4 + 3 * d * 8 * (2 + 1)                           # router + top-2 routed + shared
    heads = d * (V + 80 * 16)
    # hMLP plan for 2x4x4x3 patches in 2 layers: (1,1,1,3) -> (1,4,4,64) -> (2,4,4,.)
    # layer 0: fold 4x4 space, [48, 64] at 2 time positions; layer 1: fold 2 in time, [128, d]
    hmlp = 2 * 48 * 64 * 2 + 2 * 128 * d * 1
    assert hmlp_flops_per_patch(TOY) == hmlp
    rows, L, P = 2, 6, 3
    pairs = (1 + 2 + 3 + 3 + 3 + 3) + (1 + 2 + 3 + 4 + 5 + 6)     # sliding (w=3) + full layer
    fwd = (2 * (attn_proj + dense + moe) * rows * L
           + 2 * 2 * 4 * 2 * pairs * rows                       # (q.k + p.v) * head_dim * heads
           + 2 * heads * rows * L
           + hmlp * rows * P)
    f = forward_flops(TOY, rows=rows, row_length=L, patches_per_row=P)
    assert f["total"] == fwd == sum(v for k, v in f.items() if k != "total")
    assert train_step_flops(TOY, rows=rows, row_length=L, patches_per_row=P) == 3 * fwd


def test_hmlp_scales_with_patches_not_tokens():
    def part(key, **kw):
        return forward_flops(TOY, **({"rows": 2, "row_length": 64, "patches_per_row": 4} | kw))[key]

    per_patch = hmlp_flops_per_patch(TOY)
    assert part("hmlp") == 2 * 4 * per_patch
    assert part("hmlp", row_length=512) == part("hmlp")                 # more tokens: same hMLP
    assert part("hmlp", patches_per_row=8) == 2 * part("hmlp")          # more patches: more hMLP
    assert part("hmlp", patches_per_row=0) == 0
    assert part("backbone", patches_per_row=8) == part("backbone")      # and the backbone is per token
    assert part("backbone", row_length=128) == 2 * part("backbone")


def test_tiny_recipe_is_far_below_six_n_tokens():
    """The old numerator charged the hMLP (most of tiny's weights) and the embeddings per token."""
    from tml.model.bench import load_recipe

    cfg = load_recipe("tiny")
    new = train_step_flops(cfg, rows=4, row_length=512, patches_per_row=32)
    old = 6 * count_params(cfg)["active"] * 4 * 512
    assert 0.2 * old < new < 0.7 * old


def _dot_flops(jaxpr) -> int:
    """2 x (multiply-adds) of every dot_general / ragged_dot_general in a jaxpr, recursively."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
        elif name == "ragged_dot_general":
            (m, k), n = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape[-1]
            total += 2 * m * k * n
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _dot_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _dot_flops(sub)
    return total


@pytest.mark.parametrize("recipe", ["toy", "tiny"])
def test_count_matches_the_matmuls_of_the_traced_forward(recipe):
    """In ``standard`` mode the traced forward multiplies exactly the counted FLOPs, plus
    two documented extras that are not model FLOPs: the dense (non-causal) attention
    square and the dMel embedding computed as a one-hot matmul on every position."""
    from tml.model.bench import load_recipe

    cfg = TOY if recipe == "toy" else load_recipe("tiny")
    B, L, P = 2, 128, 3
    ps, tp = cfg.patch_size, cfg.temporal_patch_size
    shapes = {"tokens": ((B, L), "int32"), "modality": ((B, L), "int8"), "positions": ((B, L), "int32"),
              "segment_ids": ((B, L), "int32"), "micro_turn": ((B, L), "int32"),
              "loss_kind": ((B, L), "int8"), "dmel": ((B, L, cfg.n_mels), "uint8"),
              "patch_index": ((B, L), "int32"), "patches": ((B, P, tp, ps, ps, cfg.n_channels), "uint8")}
    batch = {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in shapes.items()}
    graphdef, state = nnx.split(abstract_model(cfg))
    with kernels.kernel_mode("standard"):
        jaxpr = jax.make_jaxpr(lambda s, b: nnx.merge(graphdef, s)(b))(state, batch).jaxpr
    f = forward_flops(cfg, rows=B, row_length=L, patches_per_row=P)
    dense_attention = 2 * 2 * cfg.head_dim * cfg.n_heads * L * L * cfg.n_layers * B
    dmel_onehot = 2 * cfg.n_mels * cfg.n_bins * cfg.d_model * B * L
    assert _dot_flops(jaxpr) == f["total"] - f["attention_scores"] + dense_attention + dmel_onehot
