"""The interaction model: causality, segments, co-training gradients, incremental decoding,
MoE routing. Bitwise claims compare raw bits and show the standard mode breaking them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.model.tiny_model import CFG, make_batch
from tml import kernels
from tml.model.loss import losses
from tml.model.model import KVCache
from tml.model.moe import MoE, update_balance_bias

CHUNK_KEYS = ("tokens", "modality", "positions", "segment_ids", "dmel", "patch_index")


def bits(x):
    return np.asarray(x).view(np.uint32)


def same_bits(a, b):
    return np.array_equal(bits(a), bits(b))


def run_incremental(model, append_chunk, batch, row, seg, sizes, capacity):
    """Feed one segment of a packed row to the cache in chunks of the given sizes (the
    last chunk padded to full size, with ``n_new`` saying how many tokens are real)."""
    idx = np.flatnonzero(np.asarray(batch["segment_ids"][row]) == seg)
    cache = KVCache.empty(CFG, 1, capacity)
    text, speech, i, k = [], [], 0, 0
    while i < len(idx):
        c = sizes[k % len(sizes)]
        n = min(c, len(idx) - i)
        sl = np.r_[idx[i:i + n], np.full(c - n, idx[i + n - 1])]
        chunk = {key: batch[key][row:row + 1, sl] for key in CHUNK_KEYS}
        chunk["patches"] = batch["patches"][row:row + 1]
        out = append_chunk(model, chunk, cache, jnp.asarray([n], jnp.int32))
        cache = out.cache
        text.append(np.asarray(out.text_logits[0, :n]))
        speech.append(np.asarray(out.speech_logits[0, :n]))
        i, k = i + n, k + 1
    return idx, np.concatenate(text), np.concatenate(speech)


@pytest.mark.parametrize("seed,sizes,capacity", [
    (0, [1], 320), (1, [8, 1, 1], 320), (2, [8], 448),
])
def test_incremental_equals_full_rows_bitwise(model, forward, append_chunk, seed, sizes, capacity):
    batch = make_batch(seed)
    with kernels.kernel_mode("batch_invariant"):
        full = forward(model, batch)
        segs = np.unique(np.asarray(batch["segment_ids"][0]))
        segs = segs[segs > 0]
        assert len(segs) >= 2
        for seg in (segs[0], segs[-1]):  # the first and a later (aligned) segment
            idx, text, speech = run_incremental(model, append_chunk, batch, 0, seg, sizes, capacity)
            assert same_bits(text, full.text_logits[0, idx])
            assert same_bits(speech, full.speech_logits[0, idx])


def test_standard_mode_breaks_incremental_equality(model):
    batch = make_batch(1)
    fwd = nnx.jit(lambda m, b: m(b))  # traced separately under the standard mode
    with kernels.kernel_mode("standard"):
        full = fwd(model, batch)
        seg = int(np.asarray(batch["segment_ids"][0]).max())
        ext = nnx.jit(lambda m, c, cache, n: m(c, cache=cache, n_new=n))
        idx, text, _ = run_incremental(model, ext, batch, 0, seg, [1], 320)
    assert not same_bits(text, full.text_logits[0, idx])


def test_one_call_serves_rows_and_cache(model, forward, append_chunk):
    """Full rows return no cache; a chunk returns the cache grown by n_new, its keys
    written at slots [length, length + n_new); n_new without a cache is refused."""
    batch = make_batch(0)
    assert forward(model, batch).cache is None
    chunk = {key: batch[key][0:1, :8] for key in CHUNK_KEYS} | {"patches": batch["patches"][0:1]}
    first = append_chunk(model, chunk, KVCache.empty(CFG, 1, 64), jnp.asarray([5], jnp.int32))
    assert first.cache.k.shape == (CFG.n_layers, 1, 64, CFG.n_kv_heads, CFG.head_dim)
    assert first.cache.lengths.tolist() == [5]
    second = append_chunk(model, chunk, first.cache, jnp.asarray([8], jnp.int32))
    assert second.cache.lengths.tolist() == [13]
    k1, k2 = np.asarray(first.cache.k), np.asarray(second.cache.k)
    assert same_bits(k2[:, :, :5], k1[:, :, :5])  # the sessions' slots are never rewritten
    assert same_bits(k2[0, :, 5:13], k1[0, :, :8])  # layer 0's keys depend on the tokens only
    with pytest.raises(ValueError, match="pass cache="):
        model(batch, n_new=jnp.asarray([3], jnp.int32))
    with pytest.raises(ValueError, match="make the cache larger"):
        model(chunk, cache=KVCache.empty(CFG, 1, 4))


def perturb_after(batch, row, t):
    """Change every input of micro-turns > t in one row (audio, tokens, patches)."""
    b = {k: np.array(v) for k, v in batch.items()}
    later = (b["micro_turn"][row] > t) & (b["segment_ids"][row] == b["segment_ids"][row].max())
    b["dmel"][row][later] = (b["dmel"][row][later] + 7) % 16
    b["tokens"][row][later & (b["tokens"][row] < 256)] ^= 1
    later_patches = b["patch_index"][row][later & (b["patch_index"][row] >= 0)]
    b["patches"][row][later_patches] = 255 - b["patches"][row][later_patches]
    return {k: jnp.asarray(v) for k, v in b.items()}, later


def test_causality_in_time(model, forward):
    batch = make_batch(3, n_convs=2, turns=8)
    base = forward(model, batch)
    row = 0
    seg = np.asarray(batch["segment_ids"][row])
    mt = np.asarray(batch["micro_turn"][row])
    for t in (0, 3):
        changed, later = perturb_after(batch, row, t)
        out = forward(model, changed)
        upto = (seg == seg.max()) & (mt <= t)
        assert same_bits(out.text_logits[row][upto], base.text_logits[row][upto])
        assert same_bits(out.speech_logits[row][upto], base.speech_logits[row][upto])
        assert not np.array_equal(np.asarray(out.text_logits[row][later]), np.asarray(base.text_logits[row][later]))


def test_attention_never_crosses_segments(model, forward):
    batch = make_batch(4)
    seg = np.asarray(batch["segment_ids"][0])
    last = seg.max()
    b = {k: np.array(v) for k, v in batch.items()}
    b["dmel"][0][seg == last] = 3
    b["tokens"][0][(seg == last) & (b["tokens"][0] < 256)] = 65
    out = forward(model, {k: jnp.asarray(v) for k, v in b.items()})
    base = forward(model, batch)
    other = (seg > 0) & (seg != last)
    assert same_bits(out.text_logits[0][other], base.text_logits[0][other])
    assert not same_bits(out.text_logits[0][seg == last], base.text_logits[0][seg == last])


def test_co_training_gradients_reach_every_part_at_step_zero(model):
    batch = make_batch(5)
    assert (np.asarray(batch["modality"]) == 3).any(), "batch needs video patches"

    def loss_fn(m):
        return losses(m(batch), batch)[0]

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    flat = {"/".join(str(getattr(q, "key", getattr(q, "idx", q))) for q in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))}
    groups = {"dmel": "dmel/", "hmlp": "hmlp/", "backbone": "blocks/", "text_head": "text_head/",
              "speech_head": "speech_head/", "token_embed": "token_embed"}
    for name, prefix in groups.items():
        gs = [g for k, g in flat.items() if k.startswith(prefix)]
        assert gs, name
        assert all(np.isfinite(g).all() for g in gs), name
        assert sum(float(np.abs(g).sum()) for g in gs) > 0, name
    # every routed expert tensor of the MoE layer receives gradient
    moe = [g for k, g in flat.items() if "w_gate" in k]
    assert moe and all(np.abs(g).sum() > 0 for g in moe)


def test_moe_is_dropless_deterministic_and_token_independent():
    layer = MoE(CFG, rngs=nnx.Rngs(1))
    call = nnx.jit(lambda m, x, v: m(x, v))
    x = jax.random.normal(jax.random.key(0), (3, 50, CFG.d_model))
    valid = jnp.ones((3, 50), bool)
    y1, load = call(layer, x, valid)
    y2, _ = call(layer, x, valid)
    assert same_bits(y1, y2)
    np.testing.assert_allclose(float(load.sum()), 1.0, rtol=1e-6)  # every routed slot counted
    alone, _ = call(layer, x[1:2, 7:8], valid[1:2, 7:8])  # one token by itself
    assert same_bits(alone[0, 0], y1[1, 7])
    # dropless: the output equals the sum over the token's k experts, whatever the load
    w, e = layer.route(x.reshape(-1, CFG.d_model))
    assert np.asarray(e).shape == (150, CFG.top_k)


def test_balance_bias_moves_load_toward_underused_experts():
    layer = MoE(CFG, rngs=nnx.Rngs(2))
    call = nnx.jit(lambda m, x, v: m(x, v))
    x = 1.0 + jax.random.normal(jax.random.key(1), (1, 400, CFG.d_model))
    layer.router.w[...] = layer.router.w[...].at[:, 0].add(0.05)  # expert 0 over-used
    valid = jnp.ones((1, 400), bool)

    class Holder(nnx.Module):
        def __init__(self, m):
            self.m = m

    holder = Holder(layer)
    _, load0 = call(layer, x, valid)
    for _ in range(60):
        _, load = call(layer, x, valid)
        update_balance_bias(holder, load[None], rate=0.01)
    _, load1 = call(layer, x, valid)
    spread0 = float(load0.max() - load0.min())
    spread1 = float(load1.max() - load1.min())
    assert float(load0[0]) == float(load0.max())
    assert spread1 < 0.5 * spread0, (load0, load1)
