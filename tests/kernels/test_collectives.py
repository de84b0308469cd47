"""Deterministic collectives: a row-parallel linear with C=8 canonical chunks gives the
same bits for TP = 1, 2, 4, 8 (fake CPU devices, in a subprocess); psum does not."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tml.kernels import tree_sum
from tml.kernels.testing import assert_bits_equal

HELPER = "tests.kernels.tp_invariance_check"  # run as ``python -m`` from the repository root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tp_results():
    """The 8-device subprocess's cases, started by the module's first test that needs them
    (not at import: every xdist worker imports every module, which ran it twice)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", HELPER, "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_helper_saw_eight_devices(tp_results):
    assert tp_results["device_count"] == 8


def test_row_parallel_linear_bitwise_identical_for_tp_1_2_4_8(tp_results):
    assert any("batch_invariant/two_shot" in case for case in tp_results["cases"])
    for case in tp_results["cases"]:
        for key in ("batch_invariant/one_shot", "batch_invariant/two_shot"):
            if key in case:
                assert all(case[key]["bitwise_equal_to_tp1"].values()), (case["shape"], key, case[key])
                assert case[key]["max_abs_diff"] == 0.0
        assert case.get("one_shot_equals_two_shot", True), case["shape"]
        assert case["chunked_linear_equals_tp"], case["shape"]
        assert case["rows_invariant"], case["shape"]
        tol = 1e-4 if case["dtype"] == "float32" else 5e-2  # bf16 output rounding
        assert case["max_abs_err_vs_float64"] < tol, case


def test_psum_breaks_tp_invariance(tp_results):
    std = [c for c in tp_results["cases"] if "standard/one_shot" in c]
    broken = [c for c in std if not all(c["standard/one_shot"]["bitwise_equal_to_tp1"].values())]
    assert broken, "psum was TP-invariant on every case; the companion test cannot fail"
    assert any(c["standard/one_shot"]["max_abs_diff"] > 0 for c in broken)


def test_tree_sum_order():
    parts = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)), jnp.float32)
    p = [parts[i] for i in range(8)]
    expected = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
    assert_bits_equal(jax.jit(tree_sum)(parts), jax.jit(lambda: expected)())


def test_row_parallel_linear_unbound_is_the_canonical_chunk_matmul():
    """A model's call (``axis=`` a logical name, no mesh bound): chunked_linear's bits,
    which are not kernels.linear's (one FMA chain over K vs 8 chunks in the tree), and
    whose gradients are kernels.linear's (the custom VJP: whole matmuls)."""
    from tml.kernels import chunked_linear, kernel_mode, linear, row_parallel_linear

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 70, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((128, 96)) / 11, jnp.float32)
    rp = jax.jit(lambda x, w: row_parallel_linear(x, w, axis="mlp"))
    assert_bits_equal(rp(x, w), jax.jit(chunked_linear)(x, w))
    assert not np.array_equal(np.asarray(rp(x, w)).view(np.uint32), np.asarray(jax.jit(linear)(x, w)).view(np.uint32))
    c = jnp.asarray(rng.standard_normal((3, 70, 96)), jnp.float32)  # dy = c whatever the forward bits
    grad = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * c), argnums=(0, 1)))  # noqa: E731
    for a, b in zip(grad(lambda x, w: row_parallel_linear(x, w, axis="mlp"))(x, w), grad(linear)(x, w)):
        assert_bits_equal(a, b)
    with kernel_mode("standard"):  # standard: the plain dot
        assert_bits_equal(rp(x, w), jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))(x, w))


def test_row_parallel_axes_binding_errors_and_size_one_axes():
    from jax.sharding import AbstractMesh

    from tml.kernels.collectives import bound_row_parallel, row_parallel_axes

    mesh = AbstractMesh((1, 4), ("data", "tensor"))
    with row_parallel_axes(mesh, {"mlp": "tensor", "q_heads": None}):
        assert bound_row_parallel("mlp") == (mesh, "tensor", "one_shot")
        assert bound_row_parallel("q_heads") is None
    assert bound_row_parallel("mlp") is None
    with row_parallel_axes(mesh, {"mlp": "data"}):  # an axis of size 1 splits nothing
        assert bound_row_parallel("mlp") is None
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        with row_parallel_axes(mesh, {"mlp": "model"}):
            pass
    with pytest.raises(ValueError, match="unknown algorithm"):
        with row_parallel_axes(mesh, {"mlp": "tensor"}, algorithm="ring"):
            pass
