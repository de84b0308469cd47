"""Runs ``tml.train.trainer.train`` for a list of recipes in one process (the parent sets
``XLA_FLAGS`` for fake devices, or ``TML_COORD``/``TML_NPROC``/``TML_PID`` for one of
several processes), from the repository root: ``python -m tests.train.train_worker <spec.json>``.

spec: {"corpus": dir, "cache": dir, "runs": [{"run_dir", "steps", "mesh", "devices",
"readers", "kernel_mode", "batch_size", "micro_batches"}, ...]}. After each run, process 0
writes the final model leaves to ``<run_dir>/final.npz`` (from the checkpoint) and every
process prints ``RESULT {json}``.
"""

import json
import os
import sys

import numpy as np


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import jax

    from tml.train.distributed import DistributedConfig

    dist = DistributedConfig(mode="off")
    if "TML_COORD" in os.environ:
        dist = DistributedConfig(coordinator_address=os.environ["TML_COORD"],
                                 num_processes=int(os.environ["TML_NPROC"]),
                                 process_id=int(os.environ["TML_PID"]), initialization_timeout=60)
    jax.config.update("jax_compilation_cache_dir", spec["cache"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    import dataclasses

    from tests.train.trainer_fixtures import config, final_params
    from tml.config import DataConfig
    from tml.train.trainer import train

    corpus = DataConfig(out_dir=spec["corpus"], n_conversations=12, eval_conversations=2,
                        conversations_per_shard=3, workers=1)
    for run in spec["runs"]:
        cfg = config(corpus, run["run_dir"], run["steps"], mesh=run.get("mesh"), devices=run.get("devices", 0),
                     readers=run.get("readers", 0), kernel_mode=run.get("kernel_mode", "batch_invariant"),
                     batch_size=run.get("batch_size", 4), micro_batches=run.get("micro_batches", 4))
        cfg = dataclasses.replace(cfg, distributed=dist)
        summary = train(cfg)
        step, leaves = final_params(cfg)
        if jax.process_index() == 0:
            np.savez(os.path.join(run["run_dir"], "final.npz"), *leaves)
        print("RESULT " + json.dumps({"run_dir": run["run_dir"], "step": step, "mesh": summary["mesh"],
                                      "process_index": jax.process_index()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
