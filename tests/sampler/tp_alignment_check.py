"""Helper run in a subprocess by test_tp_alignment.py: it needs 8 fake CPU devices, which
XLA creates only if the flag is set before JAX initialises.

    python -m tests.sampler.tp_alignment_check MODE OUT.npz   (from the repository root)

In kernel mode MODE, serves two sessions for three micro-turns on an engine over a
tensor-parallel mesh of 2 and of 4 devices (and of 4 with the two-shot reduction in
``batch_invariant``), scores the finished sessions with the trainer's :func:`score` on
one device, and also on the TP = 4 mesh (the trainer's forward under
:func:`tml.parallel.tensor_parallel`). The MoE layer's expert widths are sharded on
``tensor`` too (its weights' sharding is recorded). Writes every log-prob array to OUT.npz.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses

import jax
import numpy as np
from flax import nnx

from tests.model.tiny_model import CFG
from tests.parallel.parallel_fixtures import numpy_model
from tests.sampler.scenario import inputs_for, sampler_vs_score
from tml import kernels
from tml.parallel import (
    MeshConfig,
    TensorParallel,
    make_mesh,
    shard_model,
    tensor_parallel,
)
from tml.parallel.tensor import invariant_rules
from tml.sampler import Engine, score

# The tiny test model (one dense layer, one MoE layer: 4 routed experts + a shared one)
# with every column-parallel width a multiple of 64 on each of 4 ranks (q heads 4 x 64,
# kv heads 4 x 64, d_ff 256, d_expert 256 for the routed and the shared experts): XLA:CPU's GEMM gives a column other bits when a
# matrix has fewer than 64 columns per device (measured: [100, 64] @ [64, 64] split into
# 2 x 32 columns changed bits; 2 x 64 of a 128-column one did not), so narrower
# column-parallel layers would not be TP-invariant even with ordered reductions.
TP_CFG = dataclasses.replace(CFG, head_dim=64, n_kv_heads=4, d_ff=256, d_expert=256)
ENGINE = dict(max_sessions=2, batch_buckets=(2,), chunk_buckets=(32,), patch_buckets=(4,), max_output_tokens=8,
              max_text_bytes=2, max_context=128, vocoder=False)
SEEDS = (5, 6)
TURNS = 3
RUNS = (("tp2", 2, "one_shot"), ("tp4", 4, "one_shot"), ("tp4_two_shot", 4, "two_shot"))


def tp_mesh(tp: int):
    return make_mesh(MeshConfig(data=1, tensor=tp), devices=jax.devices()[:tp])


def serve(model, mesh) -> list:
    """The two sessions' outputs and committed turns: [(outputs, turns), ...]."""
    eng = Engine(model, mesh=mesh, **ENGINE)
    sids = [eng.open(seed=s) for s in SEEDS]
    feeds = [inputs_for(s, TURNS) for s in SEEDS]
    for t in range(TURNS):
        for sid, f in zip(sids, feeds):
            eng.append(sid, f[t])
        eng.tick()
    return [(eng.outputs(s), eng.turns(s)) for s in sids]


def main():
    mode, out = sys.argv[1], sys.argv[2]
    model = numpy_model(TP_CFG)
    arrays = {"device_count": np.asarray(jax.device_count())}
    with kernels.kernel_mode(mode):
        runs = RUNS if mode == "batch_invariant" else RUNS[:2]
        for name, tp, algorithm in runs:
            tp_setup = TensorParallel(tp_mesh(tp), algorithm=algorithm)
            sessions = serve(model, tp_setup)
            # the MoE layer is really split: its expert weights' F axis on ``tensor``
            placed = jax.tree_util.tree_leaves_with_path(tp_setup.place(nnx.state(model)))
            arrays[f"{name}/moe_w_down_f_axis"] = np.asarray(next(
                str(leaf.sharding.spec[1]) for path, leaf in placed if "w_down" in jax.tree_util.keystr(path)))
            scored = score(model, [turns for _, turns in sessions])  # the trainer, one device
            for i, ((outs, _), sc) in enumerate(zip(sessions, scored)):
                mine, theirs = sampler_vs_score(outs, sc)
                arrays[f"{name}/s{i}/sampler"], arrays[f"{name}/s{i}/score"] = mine, theirs
                arrays[f"{name}/s{i}/tokens"] = np.concatenate([o.tokens for o in outs])
            if name == "tp4":  # the trainer's forward on the TP = 4 mesh, same sessions
                mesh = tp_mesh(4)
                sharded = shard_model(numpy_model(TP_CFG), invariant_rules(), mesh)
                with tensor_parallel(mesh, invariant_rules()):
                    on_mesh = score(sharded, [turns for _, turns in sessions])
                for i, (a, b) in enumerate(zip(on_mesh, scored)):
                    arrays[f"trainer_tp4/s{i}/token"], arrays[f"trainer_tp1/s{i}/token"] = (
                        a.token_logprobs, b.token_logprobs)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
