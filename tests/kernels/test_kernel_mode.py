"""The mode switch: global default, scoped override, trace-time reading, mode_aware_jit."""

import jax
import jax.numpy as jnp
import pytest
from tml.kernels import (
    get_default_mode,
    get_mode,
    kernel_mode,
    matmul,
    mode_aware_jit,
    set_default_mode,
)
from tml.kernels.mode import resolve_impl
from tml.kernels.testing import bits_equal


def test_default_is_batch_invariant():
    assert get_default_mode() == "batch_invariant"
    assert get_mode() == "batch_invariant"


def test_scoped_override_nests_and_restores():
    with kernel_mode("standard"):
        assert get_mode() == "standard"
        with kernel_mode("batch_invariant"):
            assert get_mode() == "batch_invariant"
        assert get_mode() == "standard"
    assert get_mode() == "batch_invariant"


def test_global_default_and_override_precedence():
    set_default_mode("standard")
    assert get_mode() == "standard"
    with kernel_mode("batch_invariant"):
        assert get_mode() == "batch_invariant"
    assert get_mode() == "standard"


def test_unknown_mode_rejected():
    with pytest.raises(ValueError):
        set_default_mode("fast")
    with pytest.raises(ValueError), kernel_mode("nope"):
        pass
    with pytest.raises(ValueError):
        matmul(jnp.ones((2, 2)), jnp.ones((2, 2)), mode="nope")


def test_auto_impl_is_reference_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_impl(None) == "reference"
    assert resolve_impl("pallas") == "pallas"


def test_mode_is_read_at_trace_time_and_mode_aware_jit_retraces():
    traces = []

    def f(x):
        traces.append(get_mode())
        return x + 1

    plain = jax.jit(f)
    plain(jnp.ones(3))
    with kernel_mode("standard"):
        plain(jnp.ones(3))  # cached trace: the mode switch is NOT seen
    assert traces == ["batch_invariant"]

    traces.clear()
    g = mode_aware_jit(f)
    g(jnp.ones(3))
    g(jnp.ones(3))
    with kernel_mode("standard"):
        g(jnp.ones(3))
    assert traces == ["batch_invariant", "standard"]


def test_mode_aware_jit_switches_the_kernels(rng):
    x = jnp.asarray(rng.standard_normal((8, 256)), jnp.float32)  # a "few rows" GEMM
    w = jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)
    g = mode_aware_jit(lambda x, w: matmul(x, w))
    bi = jax.jit(lambda x, w: matmul(x, w, mode="batch_invariant"))(x, w)
    std = jax.jit(lambda x, w: matmul(x, w, mode="standard"))(x, w)
    assert not bits_equal(bi, std)  # the two modes differ on this input ...
    assert bits_equal(g(x, w), bi)  # ... and the wrapper picks the current one
    with kernel_mode("standard"):
        assert bits_equal(g(x, w), std)
