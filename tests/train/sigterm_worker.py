"""A toy training loop for the SIGTERM test, run from the repository root:
``python -m tests.train.sigterm_worker <ckpt_dir> <dump.npz>``.

Trains the ToyMLP forever, checkpointing every 10 steps; prints READY once the first
checkpoint is committed. On SIGTERM it saves a final checkpoint at the next step boundary,
dumps the raw bits it saved to <dump.npz>, prints FINAL_STEP and exits 0.
"""

import sys

import jax
import numpy as np
from flax import nnx

from tests.train.train_toys import TOY_CONFIG, bits, make_toy, toy_batch, train_step
from tml.data_pipelines.loader import LoaderState
from tml.train.checkpoint import Checkpointer, install_preemption_handler


def main(ckdir: str, dump: str) -> None:
    model, opt = make_toy(0)
    key = jax.random.key(1)
    step = 0
    ck = Checkpointer(ckdir, model_config=TOY_CONFIG, keep_last=2)

    def state():
        return dict(model=nnx.state(model), opt_state=nnx.state(opt), rng=key,
                    data_state=LoaderState(sample_pos=step))

    def final_save():
        ck.wait_until_finished()
        if ck.latest_step() != step:  # the periodic save may already have this step
            ck.save(step, **state(), wait=True)
        s = state()
        np.savez(dump, **{f"a{i}": b for i, b in
                          enumerate(bits(s["model"]) + bits(s["opt_state"]) + bits(s["rng"]))})
        print(f"FINAL_STEP {step}", flush=True)

    preemption = install_preemption_handler(final_save)
    try:
        while True:
            key, sub = jax.random.split(key)
            train_step(model, opt, *toy_batch(sub))
            step += 1
            if step % 10 == 0:
                ck.save(step, **state())
                if step == 10:
                    ck.wait_until_finished()
                    print("READY", flush=True)
            preemption.check()
    finally:
        ck.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
