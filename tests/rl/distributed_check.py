"""Worker of tests/rl/test_distributed.py, run from the repository root.

    python -m tests.rl.distributed_check MODE OUT_DIR            (one process, 8 fake devices)
    python -m tests.rl.distributed_check MODE OUT_DIR COORD PID  (one of two processes)

One process: ``tml rl`` on the tiny TP model (tests/sampler/tp_alignment_check.TP_CFG)
with the engine tensor-parallel on devices 1-2 and the learner on device 0. Two
processes: the same recipe as one ``jax.distributed`` program, learner = process 0, engine
= process 1 (2 fake devices each, the engine's TP mesh on process 1's). Both check every
push (``rl.check_push``) and write ``OUT_DIR/result_<pid>.json``: the records, the devices
of the learner's state and of the engine's mesh.
"""

import json
import os
import sys

ONE_PROCESS = len(sys.argv) == 3
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           + ("8" if ONE_PROCESS else "2"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import types

from tests.sampler.tp_alignment_check import TP_CFG
from tml.rl.config import EngineMeshConfig, RLConfig
from tml.train.config import DistributedConfig

RECIPE = RLConfig(init_checkpoint="none", steps=1, scenarios=["turn_taking"], group_size=2, max_micro_turns=32,
                  max_output_tokens=8, max_context=512, lr=3e-3, check_push=True,
                  rewards={"turn_taking_tor": 1.0, "turn_taking_latency": 1.0},
                  engine_mesh=EngineMeshConfig(tensor=2))


def main():
    mode, out = sys.argv[1], sys.argv[2]
    dist = DistributedConfig() if ONE_PROCESS else DistributedConfig(
        coordinator_address=sys.argv[3], num_processes=2, process_id=int(sys.argv[4]), initialization_timeout=60)
    c = dataclasses.replace(RECIPE, kernel_mode=mode, run_dir=os.path.join(out, "run"))
    cfg = types.SimpleNamespace(model=TP_CFG, rl=c, distributed=dist)

    from tml.rl import distributed as rd
    from tml.rl.loop import run

    records = run(cfg)
    import jax

    placement = rd.place(c)
    result = {"records": records, "process_index": jax.process_index(), "role": placement.role,
              "device_count": jax.device_count(),
              "learner_device": None if placement.learner_device is None else placement.learner_device.id,
              "engine_devices": [d.id for d in placement.engine.mesh.devices.flat]}
    with open(os.path.join(out, f"result_{jax.process_index()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
