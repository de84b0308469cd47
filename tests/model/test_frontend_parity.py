"""Parity of the co-trained front ends with the Inkling reference (weights copied across)."""

import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.inkling.configuration_inkling import InklingAudioConfig, InklingVisionConfig
from transformers.models.inkling.modeling_inkling import InklingAudioModel, InklingVisionModel
from transformers.models.inkling.modeling_inkling import plan_out_scales as ref_plan

from tml.model.frontends import DMelEmbedding, HMLPEncoder, plan_out_scales


def t2n(t):
    return t.detach().cpu().numpy()


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("patch,temporal", [(40, 2), (12, 2), (8, 1)])
def test_plan_out_scales_matches_reference(n_layers, patch, temporal):
    ours = plan_out_scales(temporal, patch, n_layers, 3)
    ref = t2n(ref_plan(temporal, patch, n_layers, 3))
    assert np.array_equal(ours, ref), (ours, ref)


@pytest.mark.parametrize("n_layers,d", [(2, 64), (3, 96), (4, 128)])
def test_hmlp_matches_inkling_vision_model(n_layers, d):
    torch.manual_seed(n_layers)
    ref = InklingVisionModel(InklingVisionConfig(text_hidden_size=d, n_layers=n_layers)).eval()
    for p in ref.parameters():  # non-trivial norm scales too
        with torch.no_grad():
            p.add_(0.01 * torch.randn_like(p))
    ours = HMLPEncoder(d, n_layers=n_layers, patch_size=40, temporal_patch_size=2, n_channels=3,
                       eps=1e-6, rngs=nnx.Rngs(0))
    for layer, rl in zip(ours.layers, ref.encoder_layers):
        layer.proj.w[...] = t2n(rl.projection.weight).T
        if layer.norm is not None:
            layer.norm.scale[...] = t2n(rl.layer_norm.weight)
    ours.final_norm.scale[...] = t2n(ref.final_norm.weight)
    pixels = torch.randn(5, 2, 40, 40, 3)
    want = t2n(ref(pixel_values=pixels).last_hidden_state)[:, 0]
    got = np.asarray(ours(pixels.numpy()))
    assert got.shape == want.shape == (5, d)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("n_bins,d", [(16, 64), (16, 128), (32, 48)])
def test_dmel_embedding_matches_inkling_audio_model(n_bins, d):
    torch.manual_seed(d)
    ref = InklingAudioModel(InklingAudioConfig(n_mel_bins=80, mel_vocab_size=n_bins, text_hidden_size=d)).eval()
    with torch.no_grad():
        ref.norm.weight.add_(0.1 * torch.randn_like(ref.norm.weight))
    ours = DMelEmbedding(80, n_bins, d, eps=1e-6, rngs=nnx.Rngs(0))
    ours.table[...] = t2n(ref.embed_audio_tokens.embed_audio_tokens.weight)
    ours.norm.scale[...] = t2n(ref.norm.weight)
    bins = torch.randint(0, n_bins, (2, 9, 80))
    want = t2n(ref(audio_input_ids=bins).last_hidden_state)
    got = np.asarray(ours(bins.numpy().astype(np.uint8)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
