"""The GSPMD training step keeps the batch split (tml.train.step, tml.kernels.sharded_weight_grads),
on 8 fake CPU devices in subprocesses (sharded_grads_check.py).

Unbound, the batch-invariant weight gradient ``x.T @ dy`` contracts all rows in one chain
of canonical chunks, a loop of slices along the split row dimension, and the compiler
gathers ``dy`` whole onto every device (on the TPU pod plan: the float32 logits gradient of
the whole micro-batch on every chip). Bound, every rank contracts its own rows and an
ordered reduce-scatter (all-to-all, fixed tree) sums them: the input gradient keeps its
raw bits, the weight gradient is a different association of the same products (close,
deterministic, not bitwise), and the per-device temporaries shrink.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(what: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.parallel.sharded_grads_check", what], cwd=REPO,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_weight_gradient_shard_by_shard():
    out = _check("kernel")
    unbound, bound = out["unbound"], out["bound"]
    assert unbound["dx_bitwise"]
    assert bound["all_to_all"] and not unbound["all_to_all"]
    assert bound["dx_bitwise"]                                  # dx = dy @ w.T: rows independent
    assert not bound["dw_bitwise"] and bound["dw_rel"] < 1e-5   # reassociated over the 8 row shards
    assert bound["repeat_bitwise"]                              # deterministic run to run
    # unbound: dy [2048, 512] float32 (4 MiB) gathered onto every device; bound: its 1/8 share
    assert bound["temp"] < unbound["temp"] / 2, out


@pytest.mark.slow
def test_step_temporaries_shrink_with_the_batch_split():
    out = _check("step")
    b8, b2 = out["batch_8"], out["batch_2"]
    assert b8["all_to_all"] > 0 and b2["all_to_all"] > 0
    # the tiny model's activations and logits per device: 1 row of 8 against 4 (the rest,
    # weights gathered over fsdp and the rows' fixed costs, does not shrink)
    assert b8["temp"] < 0.6 * b2["temp"], out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_ranks_looped_weight_gradient_has_the_unrolled_bits(dtype):
    """Each rank's chain runs as the loop (one [K, N] accumulator live), bitwise the
    chunk-batched unrolled GEMM that one device runs for 2,048 rows (4 chunks)."""
    import jax.numpy as jnp
    import numpy as np

    from tml.kernels import tiled_matmul as tm

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2048, 300)), dtype)
    dy = jnp.asarray(rng.standard_normal((2048, 96)), dtype)
    a = np.asarray(tm._local_weight_grad(x, dy, tm.ROW_TILE, tm.K_CHUNK, "reference"))
    b = np.asarray(tm._forward_2d(x.T, dy, tm.ROW_TILE, tm.K_CHUNK, "reference"))
    assert a.shape == b.shape == (300, 96) and np.array_equal(a.view(np.uint32), b.view(np.uint32))
