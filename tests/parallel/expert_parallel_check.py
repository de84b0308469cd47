"""Helper run in a subprocess by test_expert_parallel.py (8 fake CPU devices, which XLA
creates only if the flag is set before JAX initialises).

    python -m tests.parallel.expert_parallel_check GROUP OUT_PREFIX   (from the repository root)

GROUP ``kernel``: ``tml.parallel.expert.moe_ffn`` on a tiny routed batch (``T`` tokens,
``E`` = 8 experts, top-2), forward and the VJP of a fixed cotangent (gradients of x,
the routing weights and the three expert weights), on one device (no binding) and
expert-parallel at EP = 2, 4, 8 (the first EP devices, a pure expert mesh) and on
data 2 x expert 4, in both kernel modes; EP 8 again (same program, then re-traced after
``jax.clear_caches``) for run-to-run determinism; capacity_factor at and below the
measured largest (source, destination) count; the forward in bfloat16.

GROUP ``model``: the tiny test model (tests/parallel/parallel_fixtures.py, 4 experts)
forward on one device and on data 2 x expert 4 inside ``expert_parallel``, both modes, and
the training step's gradients (``tml.train.step``, batch_invariant) on both.

Writes ``OUT_PREFIX.npz`` (arrays ``<run>/<name>``) and ``OUT_PREFIX.json``.
"""

import os
import sys
import time
import warnings

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.parallel.parallel_fixtures import save_results
from tml import kernels
from tml.parallel import (
    DEFAULT_RULES,
    MeshConfig,
    expert_parallel,
    make_mesh,
    shard_batch,
    shard_model,
)
from tml.parallel.expert import ExpertCapacityError, dropped_assignments, moe_ffn

T, D, F, E, K = 128, 64, 64, 8, 2
GRADS = ("x", "weights", "w_gate", "w_up", "w_down")


def inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D))
    logits = rng.standard_normal((T, E)) + np.linspace(0.0, 1.5, E)  # uneven load
    ws = [rng.standard_normal(s) / np.sqrt(s[1]) for s in ((E, D, F), (E, D, F), (E, F, D))]
    dy = rng.standard_normal((T, D))
    weights, experts = kernels.route_topk(jnp.asarray(logits, jnp.float32), K)
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(x), experts, weights.astype(dtype), *map(cast, ws), cast(dy)


def fwd_bwd(x, experts, weights, wg, wu, wd, dy):
    y, vjp = jax.vjp(lambda x, w, a, b, c: moe_ffn(x, experts, w, a, b, c), x, weights, wg, wu, wd)
    return y, dict(zip(GRADS, vjp(dy), strict=True))


def mesh_of(name):
    if name.startswith("ep"):
        ep = int(name[2:])
        return make_mesh(MeshConfig(data=1, expert=ep), devices=jax.devices()[:ep])
    return make_mesh(MeshConfig(data=2, expert=4))  # "data2_expert4"


def pair_counts(experts, ep):
    """Largest number of one source's assignments to one owner at EP = ep (numpy)."""
    e = np.asarray(experts).reshape(ep, -1)  # [source, its T/ep * k assignments]
    owner = e // (E // ep)
    return int(max(np.bincount(row, minlength=ep).max() for row in owner))


def pair_overflow(experts, ep, cap):
    """Assignments past ``cap`` over all (source, destination) pairs at EP = ep (numpy)."""
    owner = np.asarray(experts).reshape(ep, -1) // (E // ep)
    return int(sum(np.maximum(np.bincount(row, minlength=ep) - cap, 0).sum() for row in owner))


def host(a):
    """A device array as numpy; bfloat16 widened to float32 (exact, so raw bits compare alike)."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == jnp.bfloat16 else a


def kernel_group(arrays, info):
    x, experts, weights, wg, wu, wd, dy = inputs()
    f = jax.jit(fwd_bwd)

    def run(key, mesh=None, mode="batch_invariant", **ep_kw):
        t = time.perf_counter()
        with kernels.kernel_mode(mode):
            if mesh is None:
                y, g = f(x, experts, weights, wg, wu, wd, dy)
            else:
                with expert_parallel(mesh, **ep_kw):
                    y, g = f(x, experts, weights, wg, wu, wd, dy)
        arrays[f"{key}/y"] = host(y)
        for n, v in g.items():
            arrays[f"{key}/{n}"] = host(v)
        info["runs"][key] = {"seconds": round(time.perf_counter() - t, 2),
                             "y_spec": str(getattr(y.sharding, "spec", None)), "y_devices": len(y.sharding.device_set)}

    for mode in ("batch_invariant", "standard"):
        run(f"one/{mode}", mode=mode)
        run(f"ep8/{mode}", mesh_of("ep8"), mode)
    for name in ("ep2", "ep4", "data2_expert4"):
        run(f"{name}/batch_invariant", mesh_of(name))
    run("ep8_again/batch_invariant", mesh_of("ep8"))  # the same compiled program
    jax.clear_caches()
    run("ep8_retraced/batch_invariant", mesh_of("ep8"))

    # capacity: just enough for the largest (source, destination) count -> the dropless bits;
    # one row less -> ExpertCapacityError (never a silent drop)
    need = pair_counts(experts, 4)
    per_pair = T // 4 * K / 4  # capacity_factor 1.0
    info["capacity"] = {"needed": need, "worst": T // 4 * min(K, E // 4)}
    run("cap_fit/batch_invariant", mesh_of("ep4"), capacity_factor=need / per_pair)
    info["capacity"]["dropped_after_fit"] = dropped_assignments()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run("cap_short/batch_invariant", mesh_of("ep4"), capacity_factor=(need - 1) / per_pair)
            info["capacity"]["short_error"] = None
        except ExpertCapacityError as e:
            info["capacity"]["short_error"] = str(e)
    info["capacity"]["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    info["capacity"]["dropped_after_short"] = dropped_assignments()
    info["capacity"]["dropped_expected"] = pair_overflow(experts, 4, need - 1)

    # bfloat16 (the model's compute dtype on accelerators)
    x, experts, weights, wg, wu, wd, dy = inputs(jnp.bfloat16)
    run("bf16_one/batch_invariant")
    run("bf16_ep4/batch_invariant", mesh_of("ep4"))


def model_group(arrays, info):
    from tests.parallel.parallel_fixtures import make_rows, numpy_model

    model, batch = numpy_model(), make_rows()
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    sm, sb = shard_model(nnx.clone(model), DEFAULT_RULES, mesh), shard_batch(batch, mesh)
    fwd = nnx.jit(lambda m, b: m(b))
    for mode in ("batch_invariant", "standard"):
        with kernels.kernel_mode(mode):
            o = fwd(model, batch)
            arrays[f"one/{mode}/text"], arrays[f"one/{mode}/speech"] = map(np.asarray, (o.text_logits,
                                                                                       o.speech_logits))
            t = time.perf_counter()
            with expert_parallel(mesh):
                o = fwd(sm, sb)
            arrays[f"data2_expert4/{mode}/text"] = np.asarray(o.text_logits)
            arrays[f"data2_expert4/{mode}/speech"] = np.asarray(o.speech_logits)
            info["runs"][f"data2_expert4/{mode}"] = {"seconds": round(time.perf_counter() - t, 2)}
    w = sm.blocks[1].mlp.w_gate[...]
    info["w_gate"] = [str(w.sharding.spec), list(w.addressable_shards[0].data.shape)]

    # the training step's gradient stage (tml.train.step; GSPMD on this mesh) inside the block
    from tml.model.loss import LossWeights
    from tml.train.step import make_train_step

    for key, m, mesh_arg, b in (("one", model, None, batch), ("data2_expert4", sm, mesh, sb)):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        grads_fn = jax.jit(make_train_step(graphdef, None, LossWeights(), 0.0, mesh=mesh_arg).gradients)
        if mesh_arg is None:
            grads, metrics, load = grads_fn(params, rest, b)
        else:
            with expert_parallel(mesh):
                grads, metrics, load = grads_fn(params, rest, b)
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_leaves_with_path(grads)}
        for name, v in flat.items():
            arrays[f"grad/{key}/{name}"] = v
        arrays[f"load/{key}"] = np.asarray(load)
        info.setdefault("metrics", {})[key] = {k: float(v) for k, v in metrics.items()}


def main():
    group, prefix = sys.argv[1], sys.argv[2]
    t0 = time.perf_counter()
    info = {"device_count": jax.device_count(), "group": group, "runs": {}}
    arrays = {}
    {"kernel": kernel_group, "model": model_group}[group](arrays, info)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    save_results(prefix, info, arrays)


if __name__ == "__main__":
    main()
