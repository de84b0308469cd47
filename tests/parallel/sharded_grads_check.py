"""Helper of test_sharded_grads.py, run as ``python -m tests.parallel.sharded_grads_check
<what>`` with 8 fake CPU devices (the device count is fixed when JAX starts); prints one
JSON line.

``kernel``: the batch-invariant weight gradient ``x.T @ dy`` of a linear whose rows are
split over fsdp=4 x expert=2, with and without :func:`tml.kernels.sharded_weight_grads`:
the gradients, a repeat, and each program's per-device temporaries.
``step``: the tiny model's GSPMD gradients program (tml.parallel.aot on fsdp=2 x expert=4)
with the batch split 8 ways (the default "batch" rule) and 2 ways (``batch: [fsdp]``):
per-device temporaries of each.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tml import kernels
from tml.parallel import MeshConfig, make_mesh

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
        "model.d_ff=64", "model.vision_layers=2", "model.n_dense_layers=1", "model.vocab_size=2048",
        "parallel.mesh.data=1", "parallel.mesh.fsdp=2", "parallel.mesh.expert=4",
        "train.batch_size=8", "loader.row_length=128", "loader.max_patches_per_row=2"]


def kernel() -> dict:
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, expert=2))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2048, 300)), jnp.float32)   # K = 300: padded to 304 = 8 x 38
    w = jnp.asarray(rng.standard_normal((300, 512)) / 17.0, jnp.float32)
    rows, rep = NamedSharding(mesh, P(("fsdp", "expert"))), NamedSharding(mesh, P())

    def grads(x, w):
        return jax.grad(lambda x, w: (kernels.linear(x, w) ** 2).sum(), argnums=(0, 1))(x, w)

    def bound(x, w):
        with kernels.sharded_weight_grads(mesh, ("data", "fsdp", "expert")):
            return grads(x, w)

    out = {}
    with kernels.kernel_mode("batch_invariant"):
        ref = jax.jit(grads)(x, w)        # one chain over all rows (placement: device 0)
        for name, fn in (("unbound", grads), ("bound", bound)):
            j = jax.jit(fn, in_shardings=(rows, rep))
            compiled = j.lower(x, w).compile()
            g, again = j(x, w), j(x, w)
            out[name] = {
                "temp": int(compiled.memory_analysis().temp_size_in_bytes),
                "all_to_all": "all-to-all" in compiled.as_text(),
                "dx_bitwise": bool(np.array_equal(np.asarray(g[0]).view(np.uint32), np.asarray(ref[0]).view(np.uint32))),
                "dw_bitwise": bool(np.array_equal(np.asarray(g[1]).view(np.uint32), np.asarray(ref[1]).view(np.uint32))),
                "dw_rel": float(jnp.abs(g[1] - ref[1]).max() / jnp.abs(ref[1]).max()),
                "repeat_bitwise": bool(all(np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
                                           for a, b in zip(g, again))),
            }
    return out


def step() -> dict:
    from tml.parallel import aot

    out = {}
    for name, extra in (("batch_8", []), ("batch_2", ["parallel.rules.batch=[fsdp]"])):
        cfg = aot.load_config([*TINY, *extra])
        plan = aot.compile_plan(cfg, jax.devices()[:8], platform="cpu")
        out[name] = {"temp": plan["programs"]["gradients"]["memory"]["temporaries"],
                     "all_to_all": plan["programs"]["gradients"]["collectives"]["all-to-all"]["count"]}
    return out


if __name__ == "__main__":
    print(json.dumps({"kernel": kernel, "step": step}[sys.argv[1]]()))
