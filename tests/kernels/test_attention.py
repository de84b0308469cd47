"""attention: full training row vs random prefill chunkings vs token-by-token decode
against a KV cache with spare capacity (raw bits), batch-size invariance, the
``standard`` companions, accuracy against jax.nn.dot_product_attention, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tml.kernels import attention
from tml.kernels.testing import assert_bits_equal, bits_equal

SETTINGS = settings(max_examples=7, deadline=None, derandomize=True)

attn = jax.jit(attention, static_argnames=("causal", "sliding_window", "scale", "split_size", "mode", "impl"))


def _problem(seed, B, L, Hkv, G, D, packed, dtype="float32"):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, L, Hkv * G, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, L, Hkv, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, L, Hkv, D)), dtype)
    if packed:
        cuts = np.sort(rng.choice(np.arange(1, max(L, 2)), size=min(3, max(L - 1, 0)), replace=False))
        seg = np.zeros((B, L), np.int32)
        for c in cuts:
            seg[:, c:] += 1
    else:
        seg = np.zeros((B, L), np.int32)
    return q, k, v, jnp.asarray(seg)


def _incremental(q, k, v, seg, chunks, capacity, seed, pad_to=None, **kw):
    """Run q in consecutive chunks against a cache of `capacity` slots; slots at or past
    the end of the current chunk hold fresh garbage each step. With `pad_to`, every
    chunk call is padded with padding queries (segment id that matches no key) to
    `pad_to` queries, so all calls share one compiled shape."""
    B, _, Hkv, D = k.shape
    rng = np.random.default_rng(seed + 1)
    # slice on the host: eager slicing of device arrays compiles one program per offset
    dtype = q.dtype
    q, k, v, seg = (np.asarray(a) for a in (q, k, v, seg))
    outs, p = [], 0
    def fill(a, shape, end):
        g = (rng.standard_normal(shape) * 100).astype(a.dtype)
        g[:, :end] = a[:, :end]
        return g

    for c in chunks:
        kc = fill(k, (B, capacity, Hkv, D), p + c)
        vc = fill(v, (B, capacity, Hkv, D), p + c)
        sc = np.asarray(rng.integers(0, 5, (B, capacity)), np.int32)
        sc[:, : p + c] = seg[:, : p + c]
        tq = pad_to or c
        qc = (rng.standard_normal((B, tq) + q.shape[2:]) * 100).astype(q.dtype)
        qc[:, :c] = q[:, p : p + c]
        pos = np.broadcast_to(np.arange(p, p + tq, dtype=np.int32), (B, tq))
        qseg = np.full((B, tq), -(2**31) + 1, np.int32)
        qseg[:, :c] = seg[:, p : p + c]
        out = attn(
            qc, kc, vc, q_positions=pos, q_segment_ids=qseg, kv_segment_ids=sc,
            kv_lengths=np.full((B,), p + c, np.int32), **kw,
        )
        out = np.asarray(out)
        assert not np.any(out[:, c:]), "padding queries must see no key"
        outs.append(out[:, :c])
        p += c
    return np.concatenate(outs, axis=1).astype(dtype)


def _random_chunks(rng, L, sizes):
    chunks, left = [], L
    while left:
        c = min(left, int(rng.choice(sizes)))
        chunks.append(c)
        left -= c
    return chunks


CAPACITY = 192  # one cache size for every example: fewer distinct shapes to compile


@SETTINGS
@given(
    # a few shapes (each new shape is a compile), crossing the 64-slot split boundaries
    L=st.sampled_from([1, 2, 7, 63, 64, 65, 100, 129]),
    hkv=st.sampled_from([1, 2]),
    g=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([32, 64]),
    window=st.sampled_from([None, 16, 50]),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_full_row_equals_chunked_prefill_and_decode(L, hkv, g, d, window, packed, seed):
    q, k, v, seg = _problem(seed, 2, L, hkv, g, d, packed)
    kw = {"sliding_window": window}
    full = attn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, **kw)
    # random prefill chunks of 1..16 queries (each call padded to 16 queries)
    chunks = _random_chunks(np.random.default_rng(seed), L, [1, 3, 7, 16])
    chunked = _incremental(q, k, v, seg, chunks, CAPACITY, seed, pad_to=16, **kw)
    assert_bits_equal(chunked, full, f"chunks {chunks}")
    # token-by-token decode (only on short rows, it is L calls)
    if L <= 70:
        decoded = _incremental(q, k, v, seg, [1] * L, CAPACITY, seed, **kw)
        assert_bits_equal(decoded, full, "token-by-token decode")


def test_kv_lengths_crossing_split_boundaries():
    for L in (64, 65, 129):
        q, k, v, seg = _problem(L, 1, L, 2, 2, 64, False)
        # prefill L-2 tokens (crossing 64 / 128), then decode 2, against a cache of 192 slots
        assert_bits_equal(_incremental(q, k, v, seg, [L - 2, 1, 1], 192, L), attn(q, k, v), f"L={L}")
    for L in (129,):  # another split size, boundary at 128
        q, k, v, seg = _problem(L, 1, L, 2, 2, 64, False)
        assert_bits_equal(
            _incremental(q, k, v, seg, [L - 1, 1], 256, L, split_size=128), attn(q, k, v, split_size=128), f"L={L}"
        )


def test_batch_size_invariance():
    # (standard attention was batch-size invariant too on the inputs tried — the batch
    # is a dot batch dimension on XLA:CPU — so its companions are the chunking ones)
    q, k, v, seg = _problem(7, 3, 90, 2, 2, 64, True)
    full = attn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    for b in range(3):
        one = attn(q[b : b + 1], k[b : b + 1], v[b : b + 1], q_segment_ids=seg[b : b + 1], kv_segment_ids=seg[b : b + 1])
        assert_bits_equal(one, full[b : b + 1], f"batch element {b}")


def test_bfloat16_inputs_are_invariant_too():
    q, k, v, seg = _problem(11, 1, 70, 2, 2, 64, False, dtype="bfloat16")
    full = attn(q, k, v)
    assert full.dtype == jnp.bfloat16
    assert_bits_equal(_incremental(q, k, v, seg, [33, 1, 36], 96, 11), full)


def test_standard_mode_breaks_chunking_invariance():
    q, k, v, seg = _problem(3, 2, 100, 2, 2, 64, False)
    full = attn(q, k, v, mode="standard")
    chunked = _incremental(q, k, v, seg, [7] * 14 + [2], 128, 3, mode="standard")
    decoded = _incremental(q, k, v, seg, [1] * 100, 128, 3, mode="standard")
    assert not bits_equal(chunked, full)
    assert not bits_equal(decoded, full)
    # the batch_invariant mode on the very same inputs
    full_bi = attn(q, k, v)
    assert_bits_equal(_incremental(q, k, v, seg, [7] * 14 + [2], 128, 3), full_bi)


def test_accuracy_against_xla():
    q, k, v, _ = _problem(5, 2, 100, 2, 2, 64, False)
    xla = jax.jit(jax.nn.dot_product_attention, static_argnames=("is_causal", "local_window_size"))
    ref = xla(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(attn(q, k, v)), np.asarray(ref), atol=3e-6, rtol=3e-6)
    ref_w = xla(q, k, v, is_causal=True, local_window_size=(16, 0))
    np.testing.assert_allclose(np.asarray(attn(q, k, v, sliding_window=17)), np.asarray(ref_w), atol=3e-6, rtol=3e-6)
    qp, kp, vp, segp = _problem(6, 2, 100, 2, 4, 32, True)
    np.testing.assert_allclose(
        np.asarray(attn(qp, kp, vp, q_segment_ids=segp, kv_segment_ids=segp)),
        np.asarray(attn(qp, kp, vp, q_segment_ids=segp, kv_segment_ids=segp, mode="standard")),
        atol=3e-6, rtol=3e-6,
    )
    # non-causal with padding (kv_lengths)
    kl = jnp.array([100, 37], jnp.int32)
    mask = (jnp.arange(100)[None, :] < kl[:, None])[:, None, None, :]
    ref_nc = xla(q, k, v, mask=mask)
    np.testing.assert_allclose(
        np.asarray(attn(q, k, v, causal=False, kv_lengths=kl)), np.asarray(ref_nc), atol=3e-6, rtol=3e-6
    )


def _loss(q, k, v, mode):
    return jnp.sum(jnp.sin(attention(q, k, v, mode=mode, sliding_window=50)))


GRAD = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=3)


def test_gradients_accurate_deterministic_and_dq_chunk_invariant():
    q, k, v, _ = _problem(9, 2, 90, 2, 2, 64, False)
    g1 = GRAD(q, k, v, "batch_invariant")
    g2 = GRAD(q, k, v, "batch_invariant")
    for a, b, name in zip(g1, g2, "qkv"):
        assert_bits_equal(a, b, f"d{name} run to run")
    gs = GRAD(q, k, v, "standard")
    for a, b in zip(g1, gs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)

    # dq of the last 20 queries computed as a chunk against the same keys
    def chunk_loss(qc, k, v):
        pos = jnp.broadcast_to(jnp.arange(70, 90, dtype=jnp.int32), (2, 20))
        return jnp.sum(jnp.sin(attention(qc, k, v, q_positions=pos, sliding_window=50)))

    dq_chunk = jax.jit(jax.grad(chunk_loss))(q[:, 70:], k, v)
    assert_bits_equal(dq_chunk, g1[0][:, 70:], "dq of a chunk")


def test_standard_mode_dq_not_chunk_invariant():
    q, k, v, _ = _problem(9, 2, 90, 2, 2, 64, False)
    dq = GRAD(q, k, v, "standard")[0]

    def chunk_loss(qc, k, v):
        pos = jnp.broadcast_to(jnp.arange(70, 90, dtype=jnp.int32), (2, 20))
        return jnp.sum(jnp.sin(attention(qc, k, v, q_positions=pos, sliding_window=50, mode="standard")))

    assert not bits_equal(jax.jit(jax.grad(chunk_loss))(q[:, 70:], k, v), dq[:, 70:])
