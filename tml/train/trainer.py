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
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tml import kernels
from tml.model.count import count_params
from tml.model.loss import LossWeights, losses
from tml.model.model import InteractionModel
from tml.model.moe import update_balance_bias


@dataclass
class TrainerConfig:
    """The training loop (``recipes/train/``)."""

    steps: int = 300
    batch_size: int = 8                # global rows per step
    micro_batches: int = 1             # gradient accumulation
    seed: int = 0
    kernel_mode: str = "batch_invariant"
    run_dir: str = "runs/train"
    resume: bool = True
    eval_every: int = 100
    eval_batches: int = 2
    loss_text: float = 1.0
    loss_speech: float = 1.0
    loss_control: float = 1.0
    measure_peak: bool = True          # measure the float32 matmul peak for MFU


def split_micro(batch: dict, n: int) -> dict:
    """[B, ...] → [n, B/n, ...] for the accumulation scan."""
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def make_train_step(graphdef, tx, weights: LossWeights, balance_rate: float):
    """A pure step: (params, rest, opt_state, batch [n_micro, B, ...]) → new state, metrics."""

    def loss_fn(params, rest, mb):
        model = nnx.merge(graphdef, params, rest)
        out = model(mb)
        loss, metrics = losses(out, mb, weights)
        return loss, (metrics, out.expert_load)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, rest, opt_state, batch):
        def micro(acc, mb):
            (loss, (metrics, load)), grads = grad_fn(params, rest, mb)
            acc = jax.tree.map(jnp.add, acc, grads)
            return acc, (metrics, load)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (metrics, loads) = jax.lax.scan(micro, zeros, batch)
        n = batch["tokens"].shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = jax.tree.map(lambda m: m.mean(0) if m.dtype.kind == "f" else m.sum(0), metrics)
        load = loads.mean(0)                                   # [n_moe_layers, E]
        model = nnx.merge(graphdef, params, rest)
        if load.shape[0]:
            update_balance_bias(model, load, balance_rate)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        metrics = metrics | {"grad_norm": optax.global_norm(grads), "expert_load": load}
        return params, rest, opt_state, metrics

    return step


def make_eval_step(graphdef, weights: LossWeights):
    def ev(params, rest, batch):
        return losses(nnx.merge(graphdef, params, rest)(batch), batch, weights)[1]

    return ev


def to_device(batch) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.as_dict().items()}


def _loader(cfg, split: str, batch_rows: int, state=None, shuffle=True):
    from tml.data_pipelines.loader import ShardLoader

    lc = cfg.loader
    return ShardLoader(cfg.data.out_dir, split=split, row_length=lc.row_length,
                       max_patches=lc.max_patches_per_row, batch_size=batch_rows,
                       align=lc.align, seed=lc.seed, shuffle=shuffle, workers=lc.workers,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       state=state)


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
    from tml.train.checkpoint import Checkpointer, install_preemption_handler
    from tml.train.distributed import init_distributed
    from tml.train.metrics_log import MetricsLogger, measure_matmul_peak_flops, mfu
    from tml.train.optim import learning_rate_at, make_optimizer

    tc = cfg.train
    init_distributed(cfg.distributed)
    kernels.set_default_mode(tc.kernel_mode)
    ensure_corpus(cfg)
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if tc.batch_size % (tc.micro_batches * jax.process_count()):
        raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of "
                         f"train.micro_batches × processes = {tc.micro_batches * jax.process_count()}")

    model = InteractionModel(cfg.model, rngs=nnx.Rngs(tc.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim)
    opt_state = tx.init(params)
    rng = jax.random.key(tc.seed)
    ckpt = Checkpointer.from_config(cfg.checkpoint, run_dir=run_dir, model_config=cfg.model)
    start, data_state = 0, None
    if tc.resume and ckpt.latest_step() is not None:
        r = ckpt.restore(model={"params": params, "rest": rest}, opt_state=opt_state, rng=rng)
        params, rest = r.model["params"], r.model["rest"]
        opt_state, rng, data_state, start = r.opt_state, r.rng, r.data_state, r.step
        print(f"resumed from step {start} in {ckpt.directory}")

    rows = tc.batch_size // jax.process_count()
    loader = _loader(cfg, "train", rows, state=data_state)
    weights = LossWeights(tc.loss_text, tc.loss_speech, tc.loss_control)
    step_fn = jax.jit(make_train_step(graphdef, tx, weights, cfg.model.balance_rate),
                      donate_argnums=(0, 1, 2))
    eval_fn = jax.jit(make_eval_step(graphdef, weights))
    tokens_per_step = tc.batch_size * cfg.loader.row_length
    flops_per_step = 6 * count_params(cfg.model)["active"] * tokens_per_step
    peak = measure_matmul_peak_flops() if tc.measure_peak else 0.0

    state = {"params": params, "rest": rest, "opt_state": opt_state, "step": start}
    it = iter(loader)

    def save(step: int, metrics=None, wait=False):
        ckpt.save(step, model={"params": state["params"], "rest": state["rest"]},
                  opt_state=state["opt_state"], rng=rng, data_state=loader.state().to_dict(),
                  metrics=metrics, wait=wait)

    handler = install_preemption_handler(lambda: save(state["step"], wait=True))
    logger = MetricsLogger.from_config(cfg.logging, run_dir, config=_plain(cfg),
                                       total_steps=tc.steps, start_step=start)
    history = []
    try:
        for step in range(start, tc.steps):
            t0 = time.perf_counter()
            batch = split_micro(to_device(next(it)), tc.micro_batches)
            p, r, o, met = step_fn(state["params"], state["rest"], state["opt_state"], batch)
            state.update(params=p, rest=r, opt_state=o, step=step + 1)
            met = jax.device_get(met)
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
                eval_metrics = evaluate(cfg, eval_fn, state, rows)
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
    summary = {"steps": state["step"], "run_dir": str(run_dir)}
    if history:
        keys = [k for k in ("loss", "loss_text", "loss_speech", "loss_control") if k in history[0]]
        summary |= {f"first_{k}": history[0][k] for k in keys} | {f"last_{k}": history[-1][k] for k in keys}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def evaluate(cfg, eval_fn, state, rows: int) -> dict:
    """Mean eval metrics over the first ``eval_batches`` batches of the held-out split."""
    loader = _loader(cfg, "eval", rows, shuffle=False)
    it = iter(loader)
    acc: dict[str, list] = {}
    for _ in range(cfg.train.eval_batches):
        met = jax.device_get(eval_fn(state["params"], state["rest"], to_device(next(it))))
        for k, v in met.items():
            if k.startswith("loss"):
                acc.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _plain(cfg) -> dict:
    try:
        return asdict(cfg)
    except TypeError:
        return {}
