"""Helper run in a subprocess by test_parallel.py: it needs 8 fake CPU devices, which
XLA creates only if the flag is set before JAX initialises.

    python -m tests.parallel.sharded_forward_check GROUP OUT_PREFIX   (from the repository root)

runs the sharded forwards of GROUP (see ``GROUPS``) of the tiny test model on an 8-row
packed batch (tests/parallel/parallel_fixtures.py) and writes ``OUT_PREFIX.npz`` (the
logits, gathered to the host) and ``OUT_PREFIX.json`` (layouts, mesh checks). The
unsharded reference logits are computed by the test process itself (one device), so
the comparison is "8-device SPMD program" vs "plain single-device program".
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.parallel.parallel_fixtures import make_rows, numpy_model, save_results
from tml import kernels
from tml.model.layers import Linear, RMSNorm
from tml.parallel import (
    DEFAULT_RULES,
    MeshConfig,
    create_sharded,
    logical_constraint,
    make_mesh,
    shard_batch,
    shard_model,
    use_rules,
)

MESHES = {
    "data8": MeshConfig(data=8),
    "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
    "expert4_tensor2": MeshConfig(data=1, expert=4, tensor=2),
}
# two groups, run as two processes side by side (2 CPU cores)
GROUPS = {
    "dp": [("data8", "batch_invariant"), ("data8", "standard")],
    "tp": [("data2_fsdp2_tensor2", "batch_invariant"), ("expert4_tensor2", "batch_invariant")],
}


def shard_shape(x) -> list:
    return list(x.addressable_shards[0].data.shape)


def mesh_checks() -> dict:
    out = {"device_count": jax.device_count()}
    m = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    out["fsdp_rest"] = dict(m.shape)
    out["axis_names"] = list(m.axis_names)
    out["default"] = dict(make_mesh().shape)
    out["subset"] = dict(make_mesh(MeshConfig(data=-1, tensor=2), devices=jax.devices()[:4]).shape)
    out["subset_devices"] = sorted(d.id for d in make_mesh(MeshConfig(data=-1, tensor=2),
                                                           devices=jax.devices()[:4]).devices.flat)
    try:
        make_mesh(MeshConfig(data=3))
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.up = Linear(64, 128, ("embed", "mlp"), rngs=rngs)
        self.norm = RMSNorm(128, eps=1e-6)


def create_sharded_check(mesh) -> dict:
    """create_sharded: every device holds only its shard, values = one-device jitted init."""
    toy = create_sharded(lambda: Toy(nnx.Rngs(3)), DEFAULT_RULES, mesh)
    ref = jax.jit(lambda: nnx.split(Toy(nnx.Rngs(3)))[1])()  # unsharded (one device)
    w = toy.up.w[...]
    return {"spec": str(w.sharding.spec), "shard_shape": shard_shape(w),
            "n_devices": len(w.sharding.device_set),
            "equal_to_jitted_init": bool(np.array_equal(np.asarray(w), np.asarray(ref["up"]["w"][...])))}


def main():
    group, prefix = sys.argv[1], sys.argv[2]
    t0 = time.perf_counter()
    info = {"device_count": jax.device_count(), "group": group, "runs": {}, "meshes": {}}
    model, batch = numpy_model(), make_rows()
    arrays = {}
    for name in sorted({m for m, _ in GROUPS[group]}):
        mesh = make_mesh(MESHES[name])
        sm = shard_model(nnx.clone(model), DEFAULT_RULES, mesh)
        sb = shard_batch(batch, mesh)
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(nnx.state(sm)), jax.tree.leaves(nnx.state(model))))
        wq, w_gate, emb = sm.blocks[0].attn.wq.w[...], sm.blocks[1].mlp.w_gate[...], sm.token_embed[...]
        info["meshes"][name] = {
            "shape": dict(mesh.shape), "params_unchanged": same,
            "wq": [str(wq.sharding.spec), shard_shape(wq)],
            "w_gate": [str(w_gate.sharding.spec), shard_shape(w_gate)],
            "token_embed": [str(emb.sharding.spec), shard_shape(emb)],
            "tokens": [str(sb["tokens"].sharding.spec), shard_shape(sb["tokens"])],
            "patches": [str(sb["patches"].sharding.spec), shard_shape(sb["patches"])],
        }
        for mesh_name, mode in GROUPS[group]:
            if mesh_name != name:
                continue
            t = time.perf_counter()
            with kernels.kernel_mode(mode):
                out = nnx.jit(lambda m, b: m(b))(sm, sb)
            key = f"{name}/{mode}"
            arrays[key + "/text"] = np.asarray(out.text_logits)
            arrays[key + "/speech"] = np.asarray(out.speech_logits)
            info["runs"][key] = {"out_spec": str(out.text_logits.sharding.spec),
                                 "out_devices": len(out.text_logits.sharding.device_set),
                                 "seconds": round(time.perf_counter() - t, 2)}
    if group == "dp":
        info["mesh_checks"] = mesh_checks()
        mesh = make_mesh(MESHES["data2_fsdp2_tensor2"])
        info["create_sharded"] = create_sharded_check(mesh)
        f = jax.jit(lambda x: logical_constraint(x * 2, ("batch", "length", "act_mlp")))
        with use_rules(DEFAULT_RULES, mesh):
            y = f(jnp.ones((8, 16, 64)))
        info["constraint_spec"] = str(y.sharding.spec)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    save_results(prefix, info, arrays)


if __name__ == "__main__":
    main()
