"""``tml train``: co-train the interaction model on packed micro-turn rows.

One jitted step for the whole model (dMel embedding, hMLP, backbone and heads under one
optimizer and one loss; :mod:`tml.train.step`). A run reads as three parts:

* **set-up** (:class:`Trainer`): processes, kernel mode, corpus, mesh, model, optimizer
  (its schedule resolved for ``train.steps``), checkpoint restore, data, compiled step,
  and a check of what the run will need: evaluation is on only if the corpus has a
  held-out split (else it says so once and skips it);
* **the loop** (:meth:`Trainer.training_steps`): one :class:`StepInfo` per completed
  step, the :class:`TrainState` of that step and its host metrics;
* **hooks** (:class:`Hook`), each called when due after a step, in order: evaluation
  (every ``train.eval_every`` steps and at the end), the history for the summary,
  logging (the first step of every ``logging.log_every``, and every evaluated step),
  checkpointing (every ``checkpoint.save_every``), preemption (every step).

No trained step is lost: the final state is saved at the end, and when anything raises
after a completed step (an evaluation, a logger, a ``KeyboardInterrupt``), the state of
the last completed step, with the loader position that goes with it, is saved before the
error leaves :meth:`Trainer.train`. Orbax checkpoints carry the model state, optimizer
state, RNG, step and the loader state, so a resumed run continues bitwise identically;
SIGTERM triggers a final save at the next step boundary.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from tml import kernels
from tml.data_pipelines.build import build_corpus
from tml.data_pipelines.loader import read_manifest, split_conversations
from tml.data_pipelines.shards import MANIFEST, format_summary
from tml.model.count import train_step_flops
from tml.model.loss import LossWeights
from tml.model.model import InteractionModel
from tml.parallel import create_sharded, make_mesh, shard_batch, state_shardings
from tml.train.checkpoint import Checkpointer
from tml.train.config import TrainerConfig  # noqa: F401  (re-exported)
from tml.train.distributed import init_distributed
from tml.train.global_batch import GlobalBatches, merge_states
from tml.train.metrics_log import MetricsLogger, measure_matmul_peak_flops, mfu
from tml.train.optim import learning_rate_at, make_optimizer
from tml.train.preemption import install_preemption_handler
from tml.train.state import StepOutput, TrainState
from tml.train.step import make_eval_step, make_train_step, split_micro  # noqa: F401  (re-exported)


def train(cfg) -> dict:
    """Run (or resume) training as configured; returns a summary of the run."""
    return Trainer(cfg).train()


@dataclass
class StepInfo:
    """One completed step, as the hooks see it."""

    step: int                  # updates done, 1-based (the step just completed)
    state: TrainState          # the state after it
    metrics: dict              # host scalars: losses, lr, timing, expert load; hooks add eval_*
    last: bool                 # the run's final step


@dataclass
class Hook:
    """``fn(info)`` after every step for which ``due(info)``."""

    fn: Callable[[StepInfo], None]
    due: Callable[[StepInfo], bool]

    @classmethod
    def every(cls, n: int, fn: Callable[[StepInfo], None], *, at_end: bool = False) -> Hook:
        """Every ``n``-th step (never when ``n`` is 0), and after the last step if ``at_end``."""
        return cls(fn, lambda i: n > 0 and (i.step % n == 0 or (at_end and i.last)))


class Trainer:
    """One run: the set-up in the constructor, :meth:`training_steps`, :meth:`train`."""

    def __init__(self, cfg):
        tc = self.tc = cfg.train
        self.cfg = cfg
        if tc.batch_size % tc.micro_batches:
            raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of "
                             f"train.micro_batches={tc.micro_batches}")
        init_distributed(cfg.distributed)
        kernels.set_default_mode(tc.kernel_mode)
        ensure_corpus(cfg)
        self.run_dir = Path(tc.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh = make_mesh_for(cfg)
        self.rules = rules = cfg.parallel.rules
        self.optim = cfg.optim.resolved(tc.steps)          # total_steps 0 → train.steps

        model = create_sharded(lambda: InteractionModel(cfg.model, rngs=nnx.Rngs(tc.seed)), rules, mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = make_optimizer(self.optim)
        # global (replicated) arrays for the leaves the compiler leaves on one device, as
        # checkpoints need
        state = TrainState.create(params, rest, on_mesh(jax.jit(tx.init)(params), mesh),
                                  on_mesh(jax.random.key(tc.seed), mesh))
        self.ckpt = Checkpointer.from_config(cfg.checkpoint, run_dir=self.run_dir, model_config=cfg.model)
        data_state = None
        if tc.resume and self.ckpt.latest_step() is not None:
            state, data_state = state.restore(self.ckpt, merge_data_states=merge_states)  # onto this mesh
            print(f"resumed from step {state.step} in {self.ckpt.directory}")
        self.state, self.start = state, state.step
        self.loader = GlobalBatches.from_config(cfg, "train", tc.batch_size, state=data_state)
        self.data_state = self.loader.state()              # the loader position of self.state
        self.evaluating = tc.eval_every > 0 and has_eval_split(cfg)

        weights = LossWeights(tc.loss_text, tc.loss_speech, tc.loss_control)
        replicated = NamedSharding(mesh, PartitionSpec())
        shardings = (state_shardings(params, rules, mesh), state_shardings(rest, rules, mesh),
                     jax.tree.map(lambda x: x.sharding, state.opt_state))
        self.step_fn = make_train_step(graphdef, tx, weights, cfg.model.balance_rate,
                                       micro_batches=tc.micro_batches, mesh=mesh,
                                       ).jit(state_shardings=shardings, metrics_sharding=replicated)
        self.eval_fn = jax.jit(make_eval_step(graphdef, weights), out_shardings=replicated)
        rows, length = tc.batch_size, cfg.loader.row_length
        self.tokens_per_step = rows * length
        self.flops_per_step = train_step_flops(cfg.model, rows=rows, row_length=length,
                                               patches_per_row=cfg.loader.max_patches_per_row)
        # the peak of one device, measured here, times the devices of the run
        self.peak = measure_matmul_peak_flops() * jax.device_count() if tc.measure_peak else 0.0
        self.history: list[dict] = []
        self.logger: MetricsLogger | None = None
        self.hooks = self.default_hooks()

    # --- the loop -------------------------------------------------------------------------

    def train_step(self, state: TrainState, batch: dict) -> StepOutput:
        """One update on this process's rows of a global batch (numpy [B / P, ...])."""
        return self.step_fn(state, shard_batch(batch, self.mesh, self.rules))

    def training_steps(self) -> Iterator[StepInfo]:
        """Run the steps from the restored one to ``train.steps``; yield each completed one
        (``self.state`` / ``self.data_state`` are then that step's)."""
        batches = iter(self.loader)
        for _ in range(self.start, self.tc.steps):
            t0 = time.perf_counter()
            out = self.train_step(self.state, next(batches))
            metrics = to_host(out.metrics)
            load = to_host(out.expert_load)
            dt = time.perf_counter() - t0
            self.state, self.data_state = out.state, self.loader.state()
            yield StepInfo(self.state.step, self.state, self.host_metrics(metrics, load, dt),
                           last=self.state.step == self.tc.steps)

    def host_metrics(self, metrics: dict, load: np.ndarray, seconds: float) -> dict:
        """The logged scalars of a step: its metrics, the learning rate it applied, timing,
        and the extremes of the expert load [n_moe_layers, E] (MoE models)."""
        out = {k: float(v) for k, v in metrics.items()}
        out |= {"lr": learning_rate_at(self.optim, self.state.step - 1), "step_seconds": seconds,
                "tokens_per_s": self.tokens_per_step / seconds,
                "mfu": mfu(self.flops_per_step, seconds, self.peak) if self.peak else None}
        if load.size:
            out |= {"expert_load_max": float(load.max()), "expert_load_min": float(load.min())}
        return out

    def train(self) -> dict:
        """The loop with its hooks; the final state saved (also when a hook raises)."""
        cfg, tc = self.cfg, self.tc
        handler = install_preemption_handler(lambda: self.save(wait=True))
        self.logger = MetricsLogger.from_config(cfg.logging, self.run_dir, config=_plain(cfg),
                                                total_steps=tc.steps, start_step=self.start)
        try:
            try:
                for info in self.training_steps():
                    for hook in self.hooks:
                        if hook.due(info):
                            hook.fn(info)
                    handler.check()
            except BaseException:
                self.save_unsaved(failing=True)    # the last completed step, before the error leaves
                raise
            self.save_unsaved()
        finally:
            self.ckpt.wait_until_finished()
            self.logger.close()
            handler.uninstall()
        return self.summary()

    # --- hooks ----------------------------------------------------------------------------

    def default_hooks(self) -> list[Hook]:
        tc, log_every = self.tc, self.cfg.logging.log_every
        hooks = [Hook.every(tc.eval_every, self.evaluate_hook, at_end=True)] if self.evaluating else []
        return hooks + [
            Hook.every(1, lambda info: self.history.append(info.metrics)),
            Hook(self.log_hook, lambda i: (i.step - 1) % log_every == 0 or "eval_loss" in i.metrics),
            Hook.every(self.cfg.checkpoint.save_every, self.checkpoint_hook),
        ]

    def evaluate_hook(self, info: StepInfo) -> None:
        info.metrics |= {f"eval_{k}": v for k, v in evaluate(self.cfg, self.eval_fn, info.state,
                                                              self.mesh).items()}

    def log_hook(self, info: StepInfo) -> None:
        self.logger.log(info.step, info.metrics)

    def checkpoint_hook(self, info: StepInfo) -> None:
        self.save(metrics={"eval_loss": info.metrics.get("eval_loss", float("nan"))})

    # --- checkpoints ----------------------------------------------------------------------

    def save(self, metrics=None, wait: bool = False) -> None:
        """Checkpoint the last completed step with its loader position."""
        self.state.save(self.ckpt, data_state=self.data_state, metrics=metrics, wait=wait)

    def save_unsaved(self, failing: bool = False) -> None:
        """Save the last completed step, blocking, unless it is the restored one or already
        saved. ``failing`` (an error is on its way out): a failing save is reported and the
        original error kept. (In a multi-process run a save is collective: an error raised
        on some processes only cannot be saved from.)"""
        if self.state.step == self.start or self.state.step in self.ckpt.all_steps(include_pending=True):
            return
        try:
            self.save(wait=True)
        except Exception as e:
            if not failing:
                raise
            print(f"[tml] could not save step {self.state.step} after the error below: {e!r}",
                  file=sys.stderr, flush=True)
            return
        if failing:
            print(f"[tml] saved step {self.state.step} to {self.ckpt.directory} before stopping "
                  f"on the error below", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        """Steps, run directory, mesh, first/last losses; written to ``summary.json``."""
        summary = {"steps": self.state.step, "run_dir": str(self.run_dir),
                   "mesh": {k: int(v) for k, v in dict(self.mesh.shape).items()}}
        if self.history:
            first, last = self.history[0], self.history[-1]
            keys = [k for k in ("loss", "loss_text", "loss_speech", "loss_control") if k in first]
            summary |= {f"first_{k}": first[k] for k in keys} | {f"last_{k}": last[k] for k in keys}
        if jax.process_index() == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def evaluate(cfg, eval_fn, state: TrainState, mesh) -> dict:
    """Mean eval metrics over the first ``eval_batches`` global batches of the held-out split."""
    # the held-out split is small: one reader per process, whatever loader.readers says
    it = iter(eval_batches(cfg))
    acc: dict[str, list] = {}
    for _ in range(cfg.train.eval_batches):
        met = to_host(eval_fn(state.params, state.rest, shard_batch(next(it), mesh, cfg.parallel.rules)))
        for k, v in met.items():
            if k.startswith("loss"):
                acc.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def eval_batches(cfg) -> GlobalBatches:
    """The held-out split's global batches, unshuffled, from its start."""
    return GlobalBatches.from_config(cfg, "eval", cfg.train.batch_size, shuffle=False, readers=0)


def has_eval_split(cfg) -> bool:
    """Whether the corpus has a held-out split to evaluate on. Without one (a corpus built
    with ``data.eval_conversations: 0``, the ``data=moshi`` default) it says so, once, and
    the run trains without evaluation. With one, its readers are opened now, so that a
    split unreadable by this many processes fails at start-up rather than after training."""
    if split_conversations(read_manifest(cfg.data.out_dir), "eval") == 0:
        if jax.process_index() == 0:
            print(f"evaluation off: the corpus at {cfg.data.out_dir} has no held-out split (0 eval "
                  f"conversations), so train.eval_every={cfg.train.eval_every} is ignored; build it "
                  f"with data.eval_conversations > 0 to evaluate", flush=True)
        return False
    eval_batches(cfg)
    return True


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
    n = cfg.parallel.devices
    if n and jax.process_count() > 1:
        raise ValueError("parallel.devices limits the devices of a single process; leave it 0 "
                         "in a multi-process run")
    if n > jax.device_count():
        raise ValueError(f"parallel.devices={n} but only {jax.device_count()} devices exist")
    return make_mesh(cfg.parallel.mesh, devices=jax.devices()[:n] if n else None)


def ensure_corpus(cfg) -> None:
    """Build the corpus of ``cfg.data`` when its manifest is missing (process 0 builds)."""
    if not (Path(cfg.data.out_dir) / MANIFEST).exists() and jax.process_index() == 0:
        print(f"no corpus at {cfg.data.out_dir}: building it first")
        print(format_summary(build_corpus(cfg.data).manifest))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("corpus ready")


def _plain(cfg) -> dict:
    try:
        return asdict(cfg)
    except TypeError:
        return {}
