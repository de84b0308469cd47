"""``tml train``: co-train the interaction model on packed micro-turn rows.

One jitted step for the whole model (dMel embedding, hMLP, backbone and heads under one
optimizer and one loss); gradient accumulation over micro-batches is a ``lax.scan``
(sequential, so the accumulation order is fixed). Orbax checkpoints carry the model
state, optimizer state, RNG, step and the loader state, so a resumed run continues
bitwise identically; SIGTERM triggers a final save.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from tml import kernels
from tml.model.count import train_step_flops
from tml.model.loss import LossWeights
from tml.model.model import InteractionModel
from tml.train.step import make_eval_step, make_train_step, split_micro  # noqa: F401  (re-exported)
from tml.train.config import TrainerConfig  # noqa: F401  (re-exported)


def to_host(tree):
    """Replicated (or single-process) device arrays → numpy, on every process."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def on_mesh(tree, mesh):
    """Leaves not yet placed on ``mesh`` (the optimizer's step counter, which the compiler
    leaves on one device; the RNG key) → replicated over it, as global arrays (what a
    multi-process checkpoint needs); the rest as they are. Values must agree across
    processes."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

    return jax.tree.map(one, tree)


def make_mesh_for(cfg):
    """The recipe's mesh (``parallel.mesh``) over all devices, or the first ``parallel.devices``."""
    from tml.parallel import make_mesh

    n = cfg.parallel.devices
    if n and jax.process_count() > 1:
        raise ValueError("parallel.devices limits the devices of a single process; leave it 0 "
                         "in a multi-process run")
    if n > jax.device_count():
        raise ValueError(f"parallel.devices={n} but only {jax.device_count()} devices exist")
    return make_mesh(cfg.parallel.mesh, devices=jax.devices()[:n] if n else None)


def ensure_corpus(cfg) -> None:
    """Build the corpus of ``cfg.data`` when its manifest is missing (process 0 builds)."""
    from tml.data_pipelines.build import build_corpus
    from tml.data_pipelines.shards import MANIFEST, format_summary

    if not (Path(cfg.data.out_dir) / MANIFEST).exists() and jax.process_index() == 0:
        print(f"no corpus at {cfg.data.out_dir}: building it first")
        print(format_summary(build_corpus(cfg.data).manifest))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("corpus ready")


def train(cfg) -> dict:
    """Run (or resume) training as configured; returns a summary of the run."""
    from tml.parallel import create_sharded, shard_batch, state_shardings
    from tml.train.checkpoint import Checkpointer, install_preemption_handler
    from tml.train.distributed import init_distributed
    from tml.train.global_batch import GlobalBatches, merge_states
    from tml.train.metrics_log import MetricsLogger, measure_matmul_peak_flops, mfu
    from tml.train.optim import learning_rate_at, make_optimizer

    tc = cfg.train
    init_distributed(cfg.distributed)
    kernels.set_default_mode(tc.kernel_mode)
    ensure_corpus(cfg)
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh_for(cfg)
    rules = cfg.parallel.rules
    if tc.batch_size % tc.micro_batches:
        raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of "
                         f"train.micro_batches={tc.micro_batches}")

    model = create_sharded(lambda: InteractionModel(cfg.model, rngs=nnx.Rngs(tc.seed)), rules, mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim)
    opt_state = on_mesh(jax.jit(tx.init)(params), mesh)
    rng = on_mesh(jax.random.key(tc.seed), mesh)     # a global (replicated) array, as checkpoints need
    ckpt = Checkpointer.from_config(cfg.checkpoint, run_dir=run_dir, model_config=cfg.model)
    start, data_state = 0, None
    if tc.resume and ckpt.latest_step() is not None:
        r = ckpt.restore(model={"params": params, "rest": rest}, opt_state=opt_state, rng=rng,
                         merge_data_states=merge_states)    # onto this run's mesh
        params, rest = r.model["params"], r.model["rest"]
        opt_state, rng, data_state, start = r.opt_state, r.rng, r.data_state, r.step
        print(f"resumed from step {start} in {ckpt.directory}")

    loader = GlobalBatches.from_config(cfg, "train", tc.batch_size, state=data_state)
    weights = LossWeights(tc.loss_text, tc.loss_speech, tc.loss_control)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = (state_shardings(params, rules, mesh), state_shardings(rest, rules, mesh),
                jax.tree.map(lambda x: x.sharding, opt_state))
    step_fn = make_train_step(graphdef, tx, weights, cfg.model.balance_rate, micro_batches=tc.micro_batches,
                              mesh=mesh).jit(state_shardings=state_sh, metrics_sharding=replicated)
    eval_fn = jax.jit(make_eval_step(graphdef, weights), out_shardings=replicated)
    tokens_per_step = tc.batch_size * cfg.loader.row_length
    flops_per_step = train_step_flops(cfg.model, rows=tc.batch_size, row_length=cfg.loader.row_length,
                                      patches_per_row=cfg.loader.max_patches_per_row)
    # the peak of one device, measured here, times the devices of the run
    peak = measure_matmul_peak_flops() * jax.device_count() if tc.measure_peak else 0.0

    state = {"params": params, "rest": rest, "opt_state": opt_state, "step": start}
    it = iter(loader)

    def save(step: int, metrics=None, wait=False):
        ckpt.save(step, model={"params": state["params"], "rest": state["rest"]},
                  opt_state=state["opt_state"], rng=rng, data_state=loader.state(),
                  metrics=metrics, wait=wait)

    handler = install_preemption_handler(lambda: save(state["step"], wait=True))
    logger = MetricsLogger.from_config(cfg.logging, run_dir, config=_plain(cfg),
                                       total_steps=tc.steps, start_step=start)
    history = []
    try:
        for step in range(start, tc.steps):
            t0 = time.perf_counter()
            batch = shard_batch(next(it), mesh, rules)
            p, r, o, met = step_fn(state["params"], state["rest"], state["opt_state"], batch)
            state.update(params=p, rest=r, opt_state=o, step=step + 1)
            met = to_host(met)
            dt = time.perf_counter() - t0
            load = met.pop("expert_load")
            out = {k: float(v) for k, v in met.items()}
            out |= {"lr": learning_rate_at(cfg.optim, step), "step_seconds": dt,
                    "tokens_per_s": tokens_per_step / dt,
                    "mfu": mfu(flops_per_step, dt, peak) if peak else None}
            if load.size:
                out["expert_load_max"] = float(load.max())
                out["expert_load_min"] = float(load.min())
            eval_metrics = None
            if tc.eval_every and ((step + 1) % tc.eval_every == 0 or step + 1 == tc.steps):
                eval_metrics = evaluate(cfg, eval_fn, state, mesh)
                out |= {f"eval_{k}": v for k, v in eval_metrics.items()}
            if step % cfg.logging.log_every == 0 or eval_metrics:
                logger.log(step + 1, out)
            history.append(out)
            if cfg.checkpoint.save_every and (step + 1) % cfg.checkpoint.save_every == 0:
                save(step + 1, metrics={"eval_loss": out.get("eval_loss", float("nan"))})
            handler.check()
        if state["step"] > start and state["step"] not in ckpt.all_steps(include_pending=True):
            save(state["step"], wait=True)
    finally:
        ckpt.wait_until_finished()
        logger.close()
        handler.uninstall()
    summary = {"steps": state["step"], "run_dir": str(run_dir),
               "mesh": {k: int(v) for k, v in dict(mesh.shape).items()}}
    if history:
        keys = [k for k in ("loss", "loss_text", "loss_speech", "loss_control") if k in history[0]]
        summary |= {f"first_{k}": history[0][k] for k in keys} | {f"last_{k}": history[-1][k] for k in keys}
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def evaluate(cfg, eval_fn, state, mesh) -> dict:
    """Mean eval metrics over the first ``eval_batches`` global batches of the held-out split."""
    from tml.parallel import shard_batch
    from tml.train.global_batch import GlobalBatches

    # the held-out split is small: one reader per process, whatever loader.readers says
    it = iter(GlobalBatches.from_config(cfg, "eval", cfg.train.batch_size, shuffle=False, readers=0))
    acc: dict[str, list] = {}
    for _ in range(cfg.train.eval_batches):
        met = to_host(eval_fn(state["params"], state["rest"], shard_batch(next(it), mesh, cfg.parallel.rules)))
        for k, v in met.items():
            if k.startswith("loss"):
                acc.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _plain(cfg) -> dict:
    try:
        return asdict(cfg)
    except TypeError:
        return {}
