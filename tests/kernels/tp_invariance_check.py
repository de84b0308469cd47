"""Helper run in a subprocess by test_collectives.py, from the repository root:
``python -m tests.kernels.tp_invariance_check [seed]``.

It needs 8 fake CPU devices, which XLA only creates if the flag is set before JAX
initialises, hence a separate process. Prints one JSON object with the results.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tml.kernels import chunked_linear, row_parallel_linear
from tml.kernels.testing import bits_equal


def run_tp(x, w, tp, mode, algorithm):
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
    f = jax.shard_map(
        lambda x, w: row_parallel_linear(x, w, axis_name="tp", algorithm=algorithm, mode=mode),
        mesh=mesh,
        in_specs=(P(None, "tp"), P("tp", None)),
        out_specs=P(),
        check_vma=False,
    )
    return np.asarray(jax.jit(f)(x, w))


def main():
    results = {"device_count": jax.device_count(), "cases": []}
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    for M, K, N, dtype in ((33, 512, 96, "float32"), (17, 256, 64, "bfloat16")):
        x = jnp.asarray(rng.standard_normal((M, K)), dtype)
        w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dtype)
        case = {"shape": [M, K, N], "dtype": dtype}
        outs = {}
        variants = [("batch_invariant", "one_shot"), ("batch_invariant", "two_shot"), ("standard", "one_shot")]
        if dtype != "float32":  # the bf16 case only checks the default algorithm
            variants = variants[:1]
        for mode, algorithm in variants:
            key = f"{mode}/{algorithm}"
            outs[key] = {tp: run_tp(x, w, tp, mode, algorithm) for tp in (1, 2, 4, 8)}
            base = outs[key][1]
            case[key] = {
                "bitwise_equal_to_tp1": {str(tp): bits_equal(outs[key][tp], base) for tp in (2, 4, 8)},
                "max_abs_diff": max(float(np.max(np.abs(outs[key][tp].astype(np.float64) - base))) for tp in (2, 4, 8)),
            }
        if "batch_invariant/two_shot" in outs:
            case["one_shot_equals_two_shot"] = all(
                bits_equal(outs["batch_invariant/one_shot"][tp], outs["batch_invariant/two_shot"][tp])
                for tp in (1, 2, 4, 8)
            )
        single = np.asarray(jax.jit(chunked_linear)(x, w))
        case["chunked_linear_equals_tp"] = bits_equal(single, outs["batch_invariant/one_shot"][1])
        exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        case["max_abs_err_vs_float64"] = float(np.max(np.abs(single.astype(np.float64) - exact)))
        # fewer rows in the same call: row-parallel result is batch-invariant too
        case["rows_invariant"] = bits_equal(run_tp(x[:3], w, 4, "batch_invariant", "one_shot"), outs["batch_invariant/one_shot"][4][:3])
        results["cases"].append(case)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
