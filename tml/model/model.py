"""The interaction model: text/control, dMel and hMLP inputs → decoder → text and dMel heads.

One call, one layer loop, two uses:

* ``model(batch)`` scores full packed rows (training, trainer-side scoring);
* ``model(chunk, cache=cache, n_new=n)`` appends a chunk of tokens to each session's
  :class:`KVCache` or :class:`PagedKVCache` (the sampler's prefill of a micro-turn's
  inputs, then decode one output token at a time); ``Outputs.cache`` is the cache after
  the chunk.

The two differ only in the :class:`AttentionMask` and in where a block's keys come from
(the row itself, or the cache with the chunk's keys written). In ``batch_invariant``
kernel mode they give bitwise-equal logits for every position
(``tests/model/test_model.py::test_incremental_equals_full_rows_bitwise``). Batches are
dicts of the arrays of :class:`tml.stream.PackedRows` (``tokens, modality, positions,
segment_ids, dmel, patch_index, patches``); patches are uint8 and normalised here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tml.model.config import ModelConfig
from tml.model.frontends import DMelEmbedding, HMLPEncoder
from tml.model.kv_cache import KVCache, LayerKV, PagedKVCache, PagedLayerKV
from tml.model.layers import Attention, AttentionMask, Linear, RMSNorm, SwiGLU, normal
from tml.model.moe import MoE
from tml.stream.layout import Modality
from tml.vision.patches import CLIP_MEAN, CLIP_STD

N_MODALITIES = len(Modality)


class Outputs(NamedTuple):
    """text_logits [B, T, V]; speech_logits [B, T, n_mels, n_bins]; hidden [B, T, d];
    expert_load [n_moe_layers, n_experts] fraction of routed slots per expert;
    cache: the :class:`KVCache` / :class:`PagedKVCache` after the chunk (None for full rows)."""

    text_logits: jax.Array
    speech_logits: jax.Array
    hidden: jax.Array
    expert_load: jax.Array
    cache: KVCache | PagedKVCache | None = None


class BlockOut(NamedTuple):
    """x [B, T, d] new hidden state; k, v [B, Tk, Hkv, hd] the keys and values attention
    used (the row's own, or the cache buffer with the chunk written; for a paged cache
    the layer's pools [n_pages, page_size, Hkv, hd]); expert_load [E]
    (None for a dense block)."""

    x: jax.Array
    k: jax.Array
    v: jax.Array
    expert_load: jax.Array | None


class Block(nnx.Module):
    """One decoder layer: (sliding-window or global) attention, then SwiGLU or MoE."""

    def __init__(self, cfg: ModelConfig, sliding: bool, moe: bool, *, rngs: nnx.Rngs, param_dtype):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, sliding, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.is_moe = moe
        self.mlp = (MoE(cfg, rngs=rngs, param_dtype=param_dtype) if moe else
                    SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, init_std=cfg.init_std, param_dtype=param_dtype))

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask, valid: jax.Array,
                 kv: LayerKV | PagedLayerKV | None = None, sliding: jax.Array | None = None) -> BlockOut:
        """Pre-norm attention and MLP/MoE, each with a residual. x [B, T, d]; positions
        [B, T] (RoPE); valid [B, T] the real tokens (MoE load); kv: this layer's cache,
        the chunk's keys are written into it and attention reads it (None: the row's own);
        sliding: the window chosen at run time (a layer scan, :meth:`Attention.__call__`)."""
        hn = self.attn_norm(x)
        k, v = self.attn.project_kv(hn, positions)
        if kv is not None:
            k, v = kv.write(k, v)
        x = x + self.attn(hn, positions, k, v, mask, sliding)
        hn = self.mlp_norm(x)
        if self.is_moe:
            y, load = self.mlp(hn, valid)
        else:
            y, load = self.mlp(hn), None
        return BlockOut(x + y, k, v, load)


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

    def heads(self, h: jax.Array, expert_load: jax.Array, cache: KVCache | PagedKVCache | None) -> Outputs:
        h = self.final_norm(h)
        speech = self.speech_head(h).reshape(*h.shape[:-1], self.cfg.n_mels, self.cfg.n_bins)
        return Outputs(self.text_head(h), speech, h, expert_load, cache)

    # ------------------------------------------------------------------------ the call
    def __call__(self, batch: dict, cache: KVCache | PagedKVCache | None = None,
                 n_new: jax.Array | None = None) -> Outputs:
        """Full packed rows, or a chunk appended to a cache; returns :class:`Outputs`.

        batch: the layout's arrays [B, T, ...]. Without ``cache`` these are full rows
        (``segment_ids`` 0 marks padding). With ``cache`` they are the next T tokens of
        each session (``positions`` continue it; ``segment_ids`` unused) and n_new int32
        [B] says how many are real (default T); the rest is padding whose outputs are
        meaningless and whose cache slots the next chunk overwrites (a paged cache writes
        them nowhere).
        """
        x = self.embed(batch)
        B, T = batch["tokens"].shape
        if cache is None:
            if n_new is not None:
                raise ValueError("n_new counts the real tokens of a chunk appended to a cache: pass "
                                 "cache= too (full rows mark padding with segment_ids 0)")
            mask = AttentionMask.for_rows(batch["segment_ids"])
            valid = batch["segment_ids"] > 0
        else:
            if T > cache.capacity:
                raise ValueError(f"a chunk of {T} tokens does not fit a cache of {cache.capacity} slots: "
                                 "make the cache larger (KVCache.empty(..., capacity=))")
            n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new.astype(jnp.int32)
            mask = cache.attention_mask(n_new, T)
            valid = jnp.arange(T)[None] < n_new[:, None]
        if cache is None and (self.cfg.scan_layers or self.cfg.remat):
            x, loads = self.rows_through_blocks(x, batch["positions"], mask, valid)
            expert_load = jnp.stack(loads) if loads else jnp.zeros((0, max(self.cfg.n_experts, 1)), jnp.float32)
            return self.heads(x, expert_load, None)
        ks, vs, loads = [], [], []
        for i, block in enumerate(self.blocks):
            out = block(x, batch["positions"], mask, valid, None if cache is None else cache.layer(i, n_new))
            x = out.x
            ks.append(out.k)
            vs.append(out.v)
            if out.expert_load is not None:
                loads.append(out.expert_load)
        expert_load = jnp.stack(loads) if loads else jnp.zeros((0, max(self.cfg.n_experts, 1)), jnp.float32)
        return self.heads(x, expert_load, None if cache is None else cache.appended(ks, vs, n_new))

    def rows_through_blocks(self, x: jax.Array, positions: jax.Array, mask: AttentionMask,
                            valid: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Full rows x [B, T, d] through every block as ``cfg.scan_layers`` / ``cfg.remat``
        ask → (x [B, T, d], the MoE layers' expert loads [E], in layer order).

        ``scan_layers``: each stretch of two or more consecutive blocks with the same MLP
        type (the same parameter tree) is one ``lax.scan`` whose body is one block, over
        the blocks' parameters stacked at trace time (the checkpoint layout is unchanged;
        the stack is one extra copy of those parameters in the step); where the stretch
        mixes sliding and full layers the body picks the window per layer
        (:meth:`Attention.__call__`'s ``sliding``). ``remat``: each block (the scan body)
        under ``jax.checkpoint``, so the backward pass keeps only each block's input.
        The arithmetic is the unrolled loop's
        (``tests/model/test_scan_layers.py`` checks the raw bits)."""
        blocks, loads, i = list(self.blocks), [], 0
        while i < len(blocks):
            j = i + 1
            while self.cfg.scan_layers and j < len(blocks) and blocks[j].is_moe == blocks[i].is_moe:
                j += 1
            x, stretch_loads = _run_blocks(blocks[i:j], x, positions, mask, valid, self.cfg.remat)
            loads += stretch_loads
            i = j
        return x, loads


def _run_blocks(blocks: list[Block], x: jax.Array, positions: jax.Array, mask: AttentionMask,
                valid: jax.Array, remat: bool) -> tuple[jax.Array, list[jax.Array]]:
    """Consecutive blocks with one parameter tree: one block called (under
    ``jax.checkpoint`` if ``remat``), or several as one ``lax.scan`` → (x, their expert
    loads [E] each, none for dense blocks)."""
    graphdef = nnx.graphdef(blocks[0])

    def body(h, xs):
        state, sliding = xs
        out = nnx.merge(graphdef, state)(h, positions, mask, valid, sliding=sliding)
        return out.x, out.expert_load

    if remat:
        body = jax.checkpoint(body)
    if len(blocks) == 1:
        x, load = body(x, (nnx.state(blocks[0]), None))
        return x, [] if load is None else [load]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in blocks])
    mixed = len({b.attn.window for b in blocks}) > 1
    sliding = jnp.asarray([b.attn.window is not None for b in blocks]) if mixed else None
    x, load = jax.lax.scan(body, x, (stacked, sliding))
    return x, [] if load is None else list(load)
