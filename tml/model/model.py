"""The interaction model: text/control, dMel and hMLP inputs → decoder → text and dMel heads.

One set of modules serves two call paths:

* ``model(batch)`` scores full packed rows (training, trainer-side scoring);
* ``model.extend(chunk, cache)`` appends a chunk of tokens to an explicit
  :class:`KVCache` (the sampler's prefill of a micro-turn's inputs, then decode one
  output token at a time) and returns the chunk's outputs and the new cache.

In ``batch_invariant`` kernel mode the two give bitwise-equal logits for every position
(``tests/model/test_incremental.py``). Batches are dicts of the arrays of
:class:`tml.stream.PackedRows` (``tokens, modality, positions, segment_ids, dmel,
patch_index, patches``); patches are uint8 and normalised here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tml.model.config import ModelConfig
from tml.model.frontends import DMelEmbedding, HMLPEncoder
from tml.model.layers import Attention, Linear, RMSNorm, SwiGLU, normal
from tml.model.moe import MoE
from tml.stream.layout import Modality
from tml.vision.patches import CLIP_MEAN, CLIP_STD

N_MODALITIES = len(Modality)


class KVCache(NamedTuple):
    """Per-session keys and values, owned by the sampler.

    k, v: [n_layers, B, capacity, Hkv, hd]; lengths: int32 [B] valid slots per session.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


class Outputs(NamedTuple):
    """text_logits [B, T, V]; speech_logits [B, T, n_mels, n_bins]; hidden [B, T, d];
    expert_load [n_moe_layers, n_experts] fraction of routed slots per expert."""

    text_logits: jax.Array
    speech_logits: jax.Array
    hidden: jax.Array
    expert_load: jax.Array


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool, moe: bool, *, rngs: nnx.Rngs, param_dtype):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, sliding, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.is_moe = moe
        self.mlp = (MoE(cfg, rngs=rngs, param_dtype=param_dtype) if moe else
                    SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, init_std=cfg.init_std, param_dtype=param_dtype))


class InteractionModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        d = cfg.d_model
        self.token_embed = nnx.Param(normal(rngs, (cfg.vocab_size, d), cfg.init_std, pdt),
                                     logical_axes=("vocab", "embed"))
        self.modality_embed = nnx.Param(normal(rngs, (N_MODALITIES, d), cfg.init_std, pdt),
                                        logical_axes=("modality", "embed"))
        self.dmel = DMelEmbedding(cfg.n_mels, cfg.n_bins, d, eps=cfg.norm_eps, rngs=rngs,
                                  init_std=cfg.init_std, param_dtype=pdt)
        self.hmlp = HMLPEncoder(d, n_layers=cfg.vision_layers, patch_size=cfg.patch_size,
                                temporal_patch_size=cfg.temporal_patch_size, n_channels=cfg.n_channels,
                                eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
        self.blocks = nnx.List([
            Block(cfg, lt == "sliding", mt == "moe", rngs=rngs, param_dtype=pdt)
            for lt, mt in zip(cfg.resolved_layer_types(), cfg.resolved_mlp_types())
        ])
        self.final_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pdt)
        self.text_head = Linear(d, cfg.vocab_size, ("embed", "vocab"), rngs=rngs,
                                init_std=cfg.init_std, param_dtype=pdt)
        self.speech_head = Linear(d, cfg.n_mels * cfg.n_bins, ("embed", "mel_vocab"), rngs=rngs,
                                  init_std=cfg.init_std, param_dtype=pdt)

    # ----------------------------------------------------------------------------- inputs
    def embed(self, batch: dict) -> jax.Array:
        """Assemble [B, T, d] input embeddings from the stream layout's modality ids."""
        dt = self.cfg.compute_dtype()
        tokens, modality = batch["tokens"], batch["modality"].astype(jnp.int32)
        tok = jnp.take(self.token_embed[...], tokens, axis=0).astype(dt)
        audio = self.dmel(batch["dmel"]).astype(dt)
        patches = batch["patches"]
        B, P = patches.shape[:2]
        pix = (patches.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        vid = self.hmlp(pix.reshape(B * P, *patches.shape[2:]).astype(dt)).reshape(B, P, -1)
        idx = jnp.maximum(batch["patch_index"], 0)
        vid = jnp.take_along_axis(vid, idx[..., None], axis=1)
        is_audio = (modality == Modality.AUDIO_IN) | (modality == Modality.SPEECH_OUT)
        x = jnp.where(is_audio[..., None], audio, tok)
        x = jnp.where((modality == Modality.VIDEO)[..., None], vid, x)
        return x + jnp.take(self.modality_embed[...], modality, axis=0).astype(dt)

    def heads(self, h: jax.Array, expert_load: jax.Array) -> Outputs:
        h = self.final_norm(h)
        speech = self.speech_head(h).reshape(*h.shape[:-1], self.cfg.n_mels, self.cfg.n_bins)
        return Outputs(self.text_head(h), speech, h, expert_load)

    def _mlp(self, block: Block, x: jax.Array, valid: jax.Array, loads: list) -> jax.Array:
        hn = block.mlp_norm(x)
        if block.is_moe:
            y, load = block.mlp(hn, valid)
            loads.append(load)
            return x + y
        return x + block.mlp(hn)

    def _stack_loads(self, loads):
        if not loads:
            return jnp.zeros((0, max(self.cfg.n_experts, 1)), jnp.float32)
        return jnp.stack(loads)

    # -------------------------------------------------------------------------- full rows
    def __call__(self, batch: dict) -> Outputs:
        """Score full packed rows: every array [B, L, ...]; returns :class:`Outputs`."""
        x = self.embed(batch)
        pos, seg = batch["positions"], batch["segment_ids"]
        attn = dict(q_segment_ids=seg, kv_segment_ids=seg)
        valid = seg > 0
        loads: list = []
        for block in self.blocks:
            hn = block.attn_norm(x)
            k, v = block.attn.project_kv(hn, pos)
            x = x + block.attn(hn, pos, k, v, attn)
            x = self._mlp(block, x, valid, loads)
        return self.heads(x, self._stack_loads(loads))

    # ---------------------------------------------------------------------- incremental
    def extend(self, chunk: dict, cache: KVCache, n_new: jax.Array | None = None) -> tuple[Outputs, KVCache]:
        """Append a chunk to each session's cache and return the chunk's outputs.

        chunk: arrays [B, C, ...] of the next tokens of each session (the layout's
        fields; ``positions`` continue each session). n_new: int32 [B] tokens of the chunk
        that are real for each session (default C); the rest are padding whose outputs
        are meaningless and whose cache slots are overwritten by the next chunk.
        """
        x = self.embed(chunk)
        B, C = chunk["tokens"].shape
        n_new = jnp.full((B,), C, jnp.int32) if n_new is None else n_new.astype(jnp.int32)
        start = cache.lengths
        slots = start[:, None] + jnp.arange(C, dtype=jnp.int32)[None]
        ones = jnp.ones((B, C), jnp.int32)
        attn = dict(q_positions=slots, q_segment_ids=ones,
                    kv_segment_ids=jnp.ones(cache.k.shape[1:3], jnp.int32),
                    kv_lengths=start + n_new)
        valid = jnp.arange(C)[None] < n_new[:, None]
        write = jax.vmap(lambda buf, new, s: jax.lax.dynamic_update_slice_in_dim(buf, new, s, axis=0))
        ks, vs, loads = [], [], []
        pos = chunk["positions"]
        for i, block in enumerate(self.blocks):
            hn = block.attn_norm(x)
            k_new, v_new = block.attn.project_kv(hn, pos)
            k_all = write(cache.k[i], k_new.astype(cache.k.dtype), start)
            v_all = write(cache.v[i], v_new.astype(cache.v.dtype), start)
            ks.append(k_all)
            vs.append(v_all)
            x = x + block.attn(hn, pos, k_all, v_all, attn)
            x = self._mlp(block, x, valid, loads)
        new_cache = KVCache(jnp.stack(ks), jnp.stack(vs), start + n_new)
        return self.heads(x, self._stack_loads(loads)), new_cache
