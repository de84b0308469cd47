"""matmul / linear: batch-size invariance (raw bits), companions showing ``standard``
breaking it, accuracy against ``jnp.dot``, deterministic and batch-invariant gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tml.kernels import linear, matmul
from tml.kernels.testing import assert_bits_equal, bits_equal

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
M_FULL = 200

bi_mm = jax.jit(functools.partial(matmul, mode="batch_invariant"))
std_mm = jax.jit(functools.partial(matmul, mode="standard"))


def _operands(seed, M, K, N, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dtype)
    return x, w


@SETTINGS
@given(
    m=st.integers(1, M_FULL),
    k=st.sampled_from([64, 100, 256, 700]),
    n=st.sampled_from([16, 64, 130, 256]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_rows_do_not_depend_on_batch_size(m, k, n, dtype, seed):
    x, w = _operands(seed, M_FULL, k, n, dtype)
    full = bi_mm(x, w)
    start = (seed % (M_FULL - m + 1))
    part = bi_mm(x[start : start + m], w)
    assert_bits_equal(part, full[start : start + m], f"rows {start}..{start + m} of {M_FULL}")


def test_standard_mode_breaks_batch_invariance():
    # XLA:CPU uses another GEMM strategy for few-row problems (measured: 2..50 rows at K=N=256)
    x, w = _operands(1, M_FULL, 256, 256, "float32")
    full = std_mm(x, w)
    assert not all(bits_equal(std_mm(x[:m], w), full[:m]) for m in (1, 8, 33))
    # ... while batch_invariant holds on the very same inputs
    full_bi = bi_mm(x, w)
    for m in (1, 8, 33):
        assert_bits_equal(bi_mm(x[:m], w), full_bi[:m])


def test_leading_dims_are_rows(rng):
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)
    y3 = bi_mm(x, w)
    assert y3.shape == (3, 5, 96)
    assert_bits_equal(y3.reshape(15, 96), bi_mm(x.reshape(15, 64), w))
    assert_bits_equal(y3[1], bi_mm(x[1], w))


@SETTINGS
@given(m=st.integers(1, 90), seed=st.integers(0, 2**16))
def test_batched_matmul_rows_invariant(m, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((3, 90, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 128, 192)), jnp.float32)
    full = bi_mm(x, w)
    assert_bits_equal(bi_mm(x[:, :m], w), full[:, :m])
    assert_bits_equal(bi_mm(x[1:2, :m], w[1:2]), full[1:2, :m])


def test_standard_mode_breaks_batched_row_invariance(rng):
    x = jnp.asarray(rng.standard_normal((3, 90, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 256, 256)), jnp.float32)
    full = std_mm(x, w)
    assert not all(bits_equal(std_mm(x[:, :m], w), full[:, :m]) for m in (8, 33))


def test_accuracy_against_jnp_dot(rng):
    for dtype, tol in (("float32", 2e-5), ("bfloat16", 2e-5)):
        x = jnp.asarray(rng.standard_normal((77, 700)), dtype)
        w = jnp.asarray(rng.standard_normal((700, 130)) / 26.0, dtype)
        exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        y = bi_mm(x, w)
        assert y.dtype == jnp.dtype(dtype)
        y32 = matmul(x, w, out_dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(y32), exact, rtol=tol, atol=tol)
        ref = jnp.dot(x, w, preferred_element_type=jnp.float32)
        np.testing.assert_allclose(np.asarray(y32), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_linear_bias(rng):
    x = jnp.asarray(rng.standard_normal((9, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 80)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(80), jnp.float32)
    np.testing.assert_allclose(np.asarray(linear(x, w, b)), np.asarray(x @ w + b), rtol=1e-5, atol=1e-5)
    full = jax.jit(linear)(x, w, b)
    assert_bits_equal(jax.jit(linear)(x[:2], w, b), full[:2])


def _loss(x, w, mode):
    return jnp.sum(jnp.sin(matmul(x, w, mode=mode)))


grad_fn = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnums=2)


def test_gradients_deterministic_and_input_grads_batch_invariant(rng):
    x = jnp.asarray(rng.standard_normal((150, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 256)) / 16, jnp.float32)
    dx1, dw1 = grad_fn(x, w, "batch_invariant")
    dx2, dw2 = grad_fn(x, w, "batch_invariant")
    assert_bits_equal(dx1, dx2, "dx run to run")
    assert_bits_equal(dw1, dw2, "dw run to run")
    for m in (1, 8, 33):
        dx_m, _ = grad_fn(x[:m], w, "batch_invariant")
        assert_bits_equal(dx_m, dx1[:m], f"dx of {m} rows")
    # accuracy of the custom VJP
    dx_s, dw_s = grad_fn(x, w, "standard")
    np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx_s), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw1), np.asarray(dw_s), rtol=1e-4, atol=1e-4)


def test_standard_mode_input_grads_not_batch_invariant(rng):
    x = jnp.asarray(rng.standard_normal((150, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 256)) / 16, jnp.float32)
    dx, _ = grad_fn(x, w, "standard")
    assert not all(bits_equal(grad_fn(x[:m], w, "standard")[0], dx[:m]) for m in (1, 8, 33))
