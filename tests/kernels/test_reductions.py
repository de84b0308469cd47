"""RMSNorm, softmax, log_softmax, logsumexp: batch-size invariance in raw bits, the
``standard`` companion, accuracy against jax.nn, batch-invariant gradients."""


import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tml.kernels import log_softmax, logsumexp, ordered_sum, pairwise_sum, rms_norm, softmax
from tml.kernels.testing import assert_bits_equal, bits_equal

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
M_FULL = 300

OPS = {
    "rms_norm": lambda x, w, mode: rms_norm(x, w, mode=mode),
    "rms_norm_noweight": lambda x, w, mode: rms_norm(x, None, mode=mode),
    "softmax": lambda x, w, mode: softmax(x, mode=mode),
    "log_softmax": lambda x, w, mode: log_softmax(x, mode=mode),
    "logsumexp": lambda x, w, mode: logsumexp(x, mode=mode),
}
JITTED = {name: jax.jit(fn, static_argnums=2) for name, fn in OPS.items()}


def _inputs(seed, M, D, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, D)) * 3, dtype)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(D), dtype)
    return x, w


@SETTINGS
@given(
    op=st.sampled_from(sorted(OPS)),
    m=st.integers(1, 40),
    d=st.sampled_from([8, 16, 64, 100, 256, 768]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_rows_do_not_depend_on_batch_size(op, m, d, dtype, seed):
    x, w = _inputs(seed, M_FULL, d, dtype)
    f = JITTED[op]
    full = f(x, w, "batch_invariant")
    start = seed % (M_FULL - m + 1)
    assert_bits_equal(f(x[start : start + m], w, "batch_invariant"), full[start : start + m], op)


def test_standard_mode_breaks_batch_invariance():
    # measured on XLA:CPU: jnp.sum over the last axis rounds differently for few rows
    for op in ("rms_norm", "softmax", "log_softmax", "logsumexp"):
        x, w = _inputs(3, M_FULL, 256, "float32")
        f = JITTED[op]
        full = f(x, w, "standard")
        broken = next((m for m in (7, 8, 3) if not bits_equal(f(x[:m], w, "standard"), full[:m])), None)
        assert broken, f"standard {op} unexpectedly batch-invariant on this input"
        assert_bits_equal(f(x[:broken], w, "batch_invariant"), f(x, w, "batch_invariant")[:broken])


def test_leading_dims(rng):
    x = jnp.asarray(rng.standard_normal((4, 6, 64)), jnp.float32)
    for name in ("rms_norm", "log_softmax"):
        f = JITTED[name]
        assert_bits_equal(f(x, jnp.ones(64), "batch_invariant")[2], f(x[2], jnp.ones(64), "batch_invariant"), name)


def test_accuracy_against_jax_nn(rng):
    x = jnp.asarray(rng.standard_normal((50, 300)) * 4, jnp.float32)
    w = jnp.asarray(rng.standard_normal(300), jnp.float32)
    xs = np.asarray(x, np.float64)
    rms = xs / np.sqrt(np.mean(xs**2, -1, keepdims=True) + 1e-6) * np.asarray(w, np.float64)
    bi = {name: np.asarray(f(x, w, "batch_invariant")) for name, f in JITTED.items()}
    np.testing.assert_allclose(bi["rms_norm"], rms, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(bi["softmax"], np.asarray(jax.nn.softmax(x)), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(bi["log_softmax"], np.asarray(jax.nn.log_softmax(x)), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(bi["logsumexp"], np.asarray(jax.nn.logsumexp(x, -1)), rtol=2e-6, atol=2e-6)
    # -inf entries (masked logits) behave like jax.nn
    xm = x.at[:, ::3].set(-jnp.inf)
    np.testing.assert_allclose(
        np.asarray(JITTED["softmax"](xm, w, "batch_invariant")), np.asarray(jax.nn.softmax(xm)), rtol=2e-6, atol=1e-7
    )


def test_pairwise_sum_order_is_the_documented_tree():
    x = np.random.default_rng(5).standard_normal((3, 11)).astype(np.float32)
    y = np.pad(x, ((0, 0), (0, 5)))
    while y.shape[1] > 1:
        h = y.shape[1] // 2
        y = (y[:, :h] + y[:, h:]).astype(np.float32)
    assert_bits_equal(jax.jit(pairwise_sum)(jnp.asarray(x)), y[:, 0])


def test_ordered_sum_is_left_to_right():
    x = (np.random.default_rng(6).standard_normal((4, 7, 5)) * 10.0 ** np.arange(7)[:, None]).astype(np.float32)
    y = x[:, 0]
    for j in range(1, 7):
        y = (y + x[:, j]).astype(np.float32)
    got = jax.jit(lambda x: ordered_sum(x, 1))(jnp.asarray(x))
    assert_bits_equal(got, y)
    assert_bits_equal(ordered_sum(jnp.asarray(x), -2), y)
    assert not bits_equal(got, pairwise_sum(jnp.asarray(x), 1))  # another order, other bits


def _loss(name, x, w, mode):
    out = OPS[name](x, w, mode)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))


GRAD = jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=(0, 3))


def test_gradients_batch_invariant_deterministic_and_accurate(rng):
    x = jnp.asarray(rng.standard_normal((60, 256)) * 2, jnp.float32)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(256), jnp.float32)
    for name in ("rms_norm", "softmax", "log_softmax", "logsumexp"):
        dx, dw = GRAD(name, x, w, "batch_invariant")
        dx2, dw2 = GRAD(name, x, w, "batch_invariant")
        assert_bits_equal(dx, dx2, f"{name} dx run to run")
        assert_bits_equal(dw, dw2, f"{name} dw run to run")
        assert_bits_equal(GRAD(name, x[:7], w, "batch_invariant")[0], dx[:7], f"{name} dx of 7 rows")
        dxs, dws = GRAD(name, x, w, "standard")
        np.testing.assert_allclose(np.asarray(dx), np.asarray(dxs), rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(dw), np.asarray(dws), rtol=1e-4, atol=1e-4, err_msg=name)


def test_standard_mode_input_grads_not_batch_invariant(rng):
    x = jnp.asarray(rng.standard_normal((60, 256)) * 2, jnp.float32)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(256), jnp.float32)
    dx, _ = GRAD("rms_norm", x, w, "standard")
    assert not all(bits_equal(GRAD("rms_norm", x[:m], w, "standard")[0], dx[:m]) for m in (1, 2, 3, 7))
