"""One of two processes of the multi-process test, run from the repository root:
``python -m tests.train.distributed_worker <ckpt_dir> [pid]``.

Starts through ``init_distributed`` (explicit flags from the environment variables
TML_COORD / TML_NPROC / TML_PID, or SLURM auto-detection when those are unset), then:
a cross-process all-gather, a jitted sum over an array sharded across both processes, a
collective checkpoint save/restore where each process gets back its own loader state, and
a preemption signal delivered to process 1 only (at step 4) that makes *both* processes
save step 5, the next agreement point, and exit.
Prints ``RESULT {json}`` lines.
"""

import json
import os
import signal
import sys

import numpy as np

from tml.train.distributed import DistributedConfig, init_distributed


def main(ckdir: str) -> None:
    if "TML_COORD" in os.environ:
        cfg = DistributedConfig(coordinator_address=os.environ["TML_COORD"],
                                num_processes=int(os.environ["TML_NPROC"]),
                                process_id=int(os.environ["TML_PID"]), initialization_timeout=60)
    else:
        cfg = DistributedConfig(initialization_timeout=60)  # auto: SLURM variables
    info = init_distributed(cfg)

    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from tml.train.checkpoint import Checkpointer, install_preemption_handler

    pid = jax.process_index()
    out = {"source": info.source, "process_index": pid, "process_count": info.process_count,
           "device_count": info.device_count}
    out["allgather"] = np.asarray(multihost_utils.process_allgather(
        np.array([pid * 10 + 1], np.int32))).reshape(-1).tolist()

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    local = np.arange(4, dtype=np.float32) + 100 * pid          # this process's rows
    x = jax.make_array_from_process_local_data(sharding, local)  # global [8]
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    out["sharded_sum"] = float(total)

    with Checkpointer(ckdir, model_config={"toy": 1}) as ck:
        ck.save(1, model={"x": x}, data_state={"epoch": 0, "shard_pos": pid}, wait=True)
        r = ck.restore(model={"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)})
        mine = np.asarray(r.model["x"].addressable_shards[0].data)
        out["restore_bitwise"] = bool(np.array_equal(mine.view(np.uint32), local.view(np.uint32)))
        out["data_state"] = r.data_state

        step = 1
        def final_save():
            ck.save(step, model={"x": x}, data_state={"epoch": 0, "shard_pos": pid}, wait=True)

        handler = install_preemption_handler(final_save, signals=(signal.SIGUSR1,), sync_every=2)
        try:
            for step in range(2, 50):  # flags are agreed on at steps 3, 5, 7, ...
                if step == 4 and pid == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)  # only process 1 is signalled
                handler.check()
        except SystemExit:
            out["preempted_at"] = step
            out["latest_after_preemption"] = ck.latest_step()
        handler.uninstall()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
