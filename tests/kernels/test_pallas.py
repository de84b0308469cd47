"""Pallas kernels: in interpret mode on CPU they equal the jnp reference bit for bit
(both the TPU and the Triton flavour of each kernel); jax.export lowers them for
"cuda" (Triton) and "tpu" (Mosaic)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tml.kernels.split_kv_attention as ska
from tml.kernels import split_kv
from tml.kernels import attention, matmul, rms_norm
from tml.kernels import pallas as P
from tml.kernels.reductions import rms_norm_reference
from tml.kernels.testing import assert_bits_equal, bits_equal

FLAVOURS = ("tpu", "triton")
K_CHUNK = {"tpu": 512, "triton": 64}  # the chunk each flavour is built with


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("M,K,N,dtype", [(100, 256, 384, "float32"), (5, 1024, 64, "float32"), (70, 512, 256, "bfloat16")])
def test_matmul_interpret_equals_reference(flavour, M, K, N, dtype):
    rng = np.random.default_rng(M)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dtype)
    kc = K_CHUNK[flavour]
    ref = jax.jit(lambda x, w: matmul(x, w, impl="reference", k_chunk=kc, out_dtype=jnp.float32))(x, w)
    ker = jax.jit(lambda x, w: P.matmul(x, w, flavour=flavour, interpret=True, k_chunk=kc, out_dtype=jnp.float32))
    out = ker(x, w)
    assert_bits_equal(out, ref, f"{flavour} matmul")
    assert_bits_equal(ker(x[:1], w), ref[:1], f"{flavour} matmul, one row")


# The model's real matmul shapes (tiny/small configs): the hMLP's K = 300, 75, 9,600 and
# 10,240, the router's N = 4 / 8, the byte vocabulary 269, and the backward products
# (dx = dy @ w.T contracts over N; dw = x.T @ dy over the row count).
REAL_SHAPES = [
    (64, 300, 320), (70, 75, 128), (64, 9600, 64), (64, 128, 269), (130, 128, 4),  # forward
    (64, 320, 300), (64, 4, 128), (64, 269, 128),                                # dx
    (300, 130, 320), (128, 100, 8),                                              # dw (K = rows)
]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("M,K,N", REAL_SHAPES)
def test_matmul_accepts_the_model_shapes(flavour, M, K, N):
    """Every K (and N) is accepted; the Triton flavour zero-pads the last K chunk to a power
    of two >= 16 and still equals the unpadded reference bit for bit, for every row count."""
    rng = np.random.default_rng(K)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), jnp.float32)
    ref = jax.jit(lambda x, w: matmul(x, w, impl="reference", out_dtype=jnp.float32))(x, w)
    ker = jax.jit(lambda x, w: P.matmul(x, w, flavour=flavour, interpret=True, out_dtype=jnp.float32))
    assert_bits_equal(ker(x, w), ref, f"{flavour} matmul {M}x{K}x{N}")
    assert_bits_equal(ker(x[:1], w), ref[:1], f"{flavour} matmul {M}x{K}x{N}, one row")


def test_triton_padding_layout():
    from tml.kernels.pallas.matmul_kernel import padded_chunks

    assert padded_chunks(300, 512) == (((0, 512),), 512)
    assert padded_chunks(75, 512) == (((0, 128),), 128)
    assert padded_chunks(4, 512) == (((0, 16),), 16)
    chunks, kp = padded_chunks(9600, 512)
    assert len(chunks) == 19 and chunks[-1] == (9216, 9728) and kp == 9728
    assert chunks[:18] == tuple((i * 512, (i + 1) * 512) for i in range(18))  # canonical chunks unchanged
    with pytest.raises(ValueError, match="power of two"):
        padded_chunks(300, 300)


def test_xla_cpu_gemm_is_not_blind_to_zero_padding_for_short_odd_k():
    """The one place the interpreted Triton flavour can differ from the reference, and why
    it is not the kernel: for K = 75 contracted into N = 4 (a dw over 75 rows, the router),
    XLA:CPU's own GEMM gives other bits for the same values zero-padded to K = 128. The
    kernel equals the reference run on the padded operands, i.e. it runs the algorithm;
    the rows of a training batch are whole tiles of 64, so this shape is not one the
    trainer produces."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 75)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((75, 4)), jnp.float32)
    ref = jax.jit(lambda x, w: matmul(x, w, impl="reference"))
    padded = ref(jnp.pad(x, ((0, 0), (0, 53))), jnp.pad(w, ((0, 53), (0, 0))))
    assert not bits_equal(ref(x, w), padded)  # XLA:CPU, not the kernel
    ker = jax.jit(lambda x, w: P.matmul(x, w, flavour="triton", interpret=True, out_dtype=jnp.float32))(x, w)
    assert_bits_equal(ker, padded, "triton flavour = reference on the zero-padded contraction")


def test_public_matmul_with_pallas_impl():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 7, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    f = jax.jit(lambda x, w, impl: matmul(x, w, impl=impl), static_argnums=2)
    assert_bits_equal(f(x, w, "pallas"), f(x, w, "reference"))
    g = jax.jit(jax.grad(lambda x, w, impl: jnp.sum(jnp.sin(matmul(x, w, impl=impl))), argnums=(0, 1)), static_argnums=2)
    for a, b in zip(g(x, w, "pallas"), g(x, w, "reference")):
        assert_bits_equal(a, b, "grad through the pallas matmul")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rms_norm_interpret_equals_reference(flavour):
    rng = np.random.default_rng(1)
    for D, dtype, weighted in ((64, "float32", True), (100, "float32", False), (256, "bfloat16", True)):
        x = jnp.asarray(rng.standard_normal((37, D)) * 3, dtype)
        w = jnp.asarray(1 + 0.1 * rng.standard_normal(D), dtype) if weighted else None
        ref = jax.jit(lambda x, w: rms_norm_reference(x, w, 1e-6))(x, w)
        out = jax.jit(lambda x, w: P.rms_norm(x, w, flavour=flavour, interpret=True))(x, w)
        assert_bits_equal(out, ref, f"{flavour} rms_norm D={D} {dtype}")
    assert_bits_equal(
        jax.jit(lambda x: rms_norm(x, impl="pallas"))(x), jax.jit(lambda x: rms_norm(x, impl="reference"))(x)
    )



def _attention_pair(flavour, window, q, k, v, q_positions=None, q_segment_ids=None, kv_segment_ids=None, kv_lengths=None):
    """(kernel, reference) outputs (out, shift, sum) for the same prepared layout."""

    def prep(q, k, v):
        return split_kv.prepare(q, k, v, q_positions, q_segment_ids, kv_segment_ids, kv_lengths, 0.125, 64)

    ref = jax.jit(lambda q, k, v: ska.reference_forward(prep(q, k, v), True, window, 64))(q, k, v)
    ker = jax.jit(
        lambda q, k, v: P.attention_forward(
            prep(q, k, v), causal=True, window=window, split_size=64, flavour=flavour, interpret=True
        )
    )(q, k, v)
    return ker, ref


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_attention_interpret_equals_reference(flavour):
    rng = np.random.default_rng(2)
    B, Hq, Hkv, D = 2, 4, 2, 64
    # training row: causal, GQA, packed segments, sliding window; Tk not a multiple of the split
    L = 150
    q = jnp.asarray(rng.standard_normal((B, L, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, L, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, L, Hkv, D)), jnp.float32)
    seg = jnp.asarray(np.repeat((np.arange(L) >= 90).astype(np.int32)[None], B, 0))
    ker, ref = _attention_pair(flavour, 40, q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    for a, b, what in zip(ker, ref, ("out", "shift", "sum")):
        assert_bits_equal(a, b, f"{flavour} attention, training row: {what}")
    # decode step against a cache with spare capacity
    cap = 192
    kc = jnp.asarray(rng.standard_normal((B, cap, Hkv, D)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((B, cap, Hkv, D)), jnp.float32)
    lens = jnp.array([101, 77], jnp.int32)
    ker, ref = _attention_pair(flavour, None, q[:, 100:101], kc, vc, q_positions=lens[:, None] - 1, kv_lengths=lens)
    for a, b, what in zip(ker, ref, ("out", "shift", "sum")):
        assert_bits_equal(a, b, f"{flavour} attention, decode: {what}")


def test_public_attention_with_pallas_impl_and_grad():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 70, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 70, 2, 64)), jnp.float32)
    f = jax.jit(lambda q, k, impl: attention(q, k, k, impl=impl, sliding_window=33), static_argnums=2)
    assert_bits_equal(f(q, k, "pallas"), f(q, k, "reference"))
    g = jax.jit(jax.grad(lambda q, k, impl: jnp.sum(jnp.sin(attention(q, k, k, impl=impl))), argnums=(0, 1)), static_argnums=2)
    for a, b in zip(g(q, k, "pallas"), g(q, k, "reference")):
        assert_bits_equal(a, b, "grad with the pallas forward")


# ---------------------------------------------------------------------------
# lowering for GPU (Triton) and TPU (Mosaic) with jax.export
# ---------------------------------------------------------------------------

TARGETS = [
    ("cuda", "triton", "__gpu$xla.gpu.triton"),
    ("rocm", "triton", "__gpu$xla.gpu.triton"),
    ("tpu", "tpu", "tpu_custom_call"),
]


def _attention_fn(flavour):
    def f(q, k, v, lens):
        L_ = split_kv.prepare(q, k, v, lens[:, None] - 1, None, None, lens, 0.125, 64)
        return P.attention_forward(L_, causal=True, window=128, split_size=64, flavour=flavour, interpret=False)

    return f


KERNELS = {
    "matmul_f32": (
        lambda fl: functools.partial(P.matmul, flavour=fl, interpret=False, k_chunk=K_CHUNK[fl]),
        (jnp.ones((100, 256)), jnp.ones((256, 384))),
    ),
    "matmul_bf16": (
        lambda fl: functools.partial(P.matmul, flavour=fl, interpret=False, k_chunk=K_CHUNK[fl]),
        (jnp.ones((64, 512), jnp.bfloat16), jnp.ones((512, 128), jnp.bfloat16)),
    ),
    "matmul_hmlp_k300": (
        lambda fl: functools.partial(P.matmul, flavour=fl, interpret=False),
        (jnp.ones((64, 300), jnp.bfloat16), jnp.ones((300, 320), jnp.bfloat16)),
    ),
    "matmul_hmlp_k9600": (
        lambda fl: functools.partial(P.matmul, flavour=fl, interpret=False),
        (jnp.ones((64, 9600)), jnp.ones((9600, 512))),
    ),
    "matmul_router_dx_k4": (
        lambda fl: functools.partial(P.matmul, flavour=fl, interpret=False),
        (jnp.ones((64, 4)), jnp.ones((4, 128))),
    ),
    "rms_norm": (
        lambda fl: functools.partial(P.rms_norm, flavour=fl, interpret=False),
        (jnp.ones((40, 256)), jnp.ones((256,))),
    ),
    "attention_decode": (
        _attention_fn,
        (jnp.ones((2, 1, 4, 64)), jnp.ones((2, 256, 2, 64)), jnp.ones((2, 256, 2, 64)), jnp.array([100, 7], jnp.int32)),
    ),
    "attention_prefill": (
        _attention_fn,
        (jnp.ones((1, 96, 4, 64)), jnp.ones((1, 192, 2, 64)), jnp.ones((1, 192, 2, 64)), jnp.array([150], jnp.int32)),
    ),
}


@pytest.mark.parametrize("platform,flavour,custom_call", TARGETS)
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernels_lower_for_gpu_and_tpu(kernel, platform, flavour, custom_call):
    make, args = KERNELS[kernel]
    exported = P.export_for(make(flavour), platform, *args)
    assert exported.platforms == (platform,)
    assert custom_call in exported.mlir_module()
