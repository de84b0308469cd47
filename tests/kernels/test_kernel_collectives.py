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

HELPER = os.path.join(os.path.dirname(__file__), "tp_invariance_check.py")


@pytest.fixture(scope="module")
def tp_results():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, HELPER, "0"], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_helper_saw_eight_devices(tp_results):
    assert tp_results["device_count"] == 8


def test_row_parallel_linear_bitwise_identical_for_tp_1_2_4_8(tp_results):
    for case in tp_results["cases"]:
        for key in ("batch_invariant/one_shot", "batch_invariant/two_shot"):
            assert all(case[key]["bitwise_equal_to_tp1"].values()), (case["shape"], key, case[key])
            assert case[key]["max_abs_diff"] == 0.0
        assert case["one_shot_equals_two_shot"], case["shape"]
        assert case["chunked_linear_equals_tp"], case["shape"]
        assert case["rows_invariant"], case["shape"]
        tol = 1e-4 if case["dtype"] == "float32" else 5e-2  # bf16 output rounding
        assert case["max_abs_err_vs_float64"] < tol, case


def test_psum_breaks_tp_invariance(tp_results):
    broken = [c for c in tp_results["cases"] if not all(c["standard/one_shot"]["bitwise_equal_to_tp1"].values())]
    assert broken, "psum was TP-invariant on every case; the companion test cannot fail"
    assert any(c["standard/one_shot"]["max_abs_diff"] > 0 for c in broken)


def test_tree_sum_order():
    parts = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)), jnp.float32)
    p = [parts[i] for i in range(8)]
    expected = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
    assert_bits_equal(jax.jit(tree_sum)(parts), jax.jit(lambda: expected)())
