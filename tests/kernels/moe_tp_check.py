"""Helper run in a subprocess by test_moe.py, from the repository root:
``python -m tests.kernels.moe_tp_check``.

``kernels.moe_ffn(axis="expert_mlp")`` on a mesh axis of 2, 4 and 8 fake CPU devices (the
expert width F split, the down projection's 8 canonical chunks reduced one-shot or
two-shot) against the same call unbound on one device, for the grouped path (24 tokens)
and the GEMV decode path (2 tokens), float32 and bfloat16. Prints one JSON object:
``{case: {tp: bitwise equal to one device}}`` and the max |diff| of ``standard`` (psum).
"""

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tml.kernels import moe_ffn, route_topk
from tml.kernels.collectives import row_parallel_axes
from tml.kernels.testing import bits_equal

D, F, E, K = 64, 512, 4, 2  # F / 8 ranks = 64 columns per rank (XLA:CPU column-slice invariance)


def main():
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(s) / np.sqrt(s[1]) for s in ((E, D, F), (E, D, F), (E, F, D))]
    x_all = rng.standard_normal((24, D))
    router = rng.standard_normal((D, E))
    out = {"device_count": jax.device_count(), "cases": {}}
    for dtype in ("float32", "bfloat16"):
        wg, wu, wd = (jnp.asarray(a, dtype) for a in w)
        for path, T in (("grouped", 24), ("gemv", 2)):
            x = jnp.asarray(x_all[:T], dtype)
            weights, experts = route_topk(jnp.asarray(x_all[:T] @ router, jnp.float32), K)
            weights = weights.astype(dtype)
            for mode in ("batch_invariant", "standard"):
                if mode == "standard" and path == "gemv":
                    continue
                p = "grouped" if mode == "standard" else path
                run = jax.jit(lambda x, e, wt, a, b, c, _m=mode, _p=p: moe_ffn(x, e, wt, a, b, c, mode=_m, path=_p,
                                                                               axis="expert_mlp"))
                one = np.asarray(run(x, experts, weights, wg, wu, wd).astype(jnp.float32))
                case = out["cases"].setdefault(f"{dtype}/{path}/{mode}", {})
                for tp, algorithm in ((2, "one_shot"), (4, "one_shot"), (4, "two_shot"), (8, "one_shot")):
                    mesh = Mesh(np.array(jax.devices()[:tp]), ("tensor",))
                    cols, rows = NamedSharding(mesh, P(None, None, "tensor")), NamedSharding(mesh, P(None, "tensor"))
                    a, b, c = jax.device_put(wg, cols), jax.device_put(wu, cols), jax.device_put(wd, rows)
                    with row_parallel_axes(mesh, {"expert_mlp": "tensor"}, algorithm=algorithm):
                        got = np.asarray(run(x, experts, weights, a, b, c).astype(jnp.float32))
                    case[f"tp{tp}/{algorithm}"] = {"bitwise": bits_equal(got, one),
                                                   "max_diff": float(np.max(np.abs(got - one)))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
