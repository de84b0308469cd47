"""Where ``tml rl`` runs: the engine on another mesh than the learner, and the engine and
the learner as two processes of one ``jax.distributed`` program.

**Placement** (:func:`place`, from ``rl.engine_mesh`` and the process count):

* one process, ``rl.engine_mesh.tensor=1``: engine and learner share the first device (the
  plain loop);
* one process, ``tensor=T > 1``: the learner on device 0 (data-parallel 1), the engine
  tensor-parallel on devices ``1 .. T`` (:class:`tml.parallel.TensorParallel`, the
  :func:`~tml.parallel.invariant_rules` layout), so ``1 + T`` devices are needed; the push
  is ``Engine.set_params``, a ``jax.device_put`` onto the engine's shardings;
* two processes (``distributed.coordinator_address/num_processes=2/process_id``): process
  0 is the learner (its first device; it logs ``metrics.jsonl`` and writes the
  checkpoints, as process 0 does in training), process 1 the engine on its first ``T``
  devices. :func:`serve_engine` is the engine process's whole run.

**Between the processes** everything goes through JAX's own cross-process collective,
``multihost_utils.process_allgather`` (gloo on CPU): :func:`send` pickles an object on one
process and all-gathers the bytes (the learner sends the scenario counters, the engine the
played episodes with their rewards); :func:`push_weights` all-gathers the raw bytes of every
weight as one ``uint8`` buffer. Measured on XLA:CPU with 2 local processes: the all-gather
moves bits unchanged (``-0.0`` stays ``-0.0``), while ``multihost_utils.broadcast_one_to_all``
(a ``psum`` with zeros) turned ``-0.0`` into ``+0.0``, so it is not used for weights.
A single-device array cannot be ``device_put`` onto another process's device, and Orbax
refuses host-local ``jax.Array`` s in a multi-process save ("Cannot serialize host local
jax.Array"), so in two processes the RL state is checkpointed from host copies by both
processes together (:func:`save_state` / :func:`restore_state`: only process 0's values are
written; the engine process passes zeros of the same shapes).

The learner drives (:class:`RemoteEngine`): every collective it enters is announced by a
message the engine process acts on (:func:`serve_engine`), so both enter the same ones in
the same order. Per step: ``check`` (the preemption flags, OR-ed across both processes),
``play`` (the learner's groups, picked by :func:`tml.rl.episodes.step_groups` as in one
process → the engine's episodes, rewards and dropped list), the learner scores and
updates, ``push`` (:func:`push_weights`, then the engine's ack: compile counter,
set_params seconds and, with ``rl.check_push``, the sha256 of its weights,
:func:`tml.sampler.snapshot.weights_digest`).

**google-tunix** (read at its source, ``tunix/rl/rollout/base_rollout.py`` and
``tunix/rl/grpo/``): its ``RLCluster`` holds an actor, a reference and a rollout model, each
on its own mesh, and syncs weights by resharding the actor's state onto the rollout mesh;
a rollout worker is a ``BaseRollout`` with ``generate(prompts: list[str], RolloutConfig) ->
RolloutOutput(text, logits, tokens, left_padded_prompt_tokens, logprobs)``,
``get_per_token_logps(prompt_tokens, completion_tokens)`` and ``update_params(params)``
(vanilla, vLLM and SGLang-JAX engines), and ``GRPOLearner`` / ``PPOLearner`` score text
completions of a prompt dataset with reward functions over strings. What fits: the same
split (learner mesh, rollout mesh, weight sync by reshard — :func:`place` and
:func:`push_weights` here) and the same algorithms (GRPO/Dr.GRPO baselines, PPO-clip, k3
KL), which :mod:`tml.rl.objectives` implements and tests. What does not, so tml does not
use it: a tml episode is not a prompt and a completion but a streaming session of 200 ms
micro-turns (user audio, video, typed text in; text, speech frames, control out; the
user reacting to the model) served by :class:`tml.sampler.Engine`, whose log-probs must be
the bits of :func:`tml.sampler.score`'s uncut training-program row — a ``BaseRollout``'s
left-padded prompt/completion layout runs other programs, so the drift metrics would
measure tunix's layout, not tml's. Its rewards are functions of text, not the eval
scorers over micro-turn timelines. So tml keeps its engine, ``score`` and learner and
shares only tunix's design of one learner mesh and one rollout mesh with a push between.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass

import jax
import numpy as np

from tml.rl.config import RLConfig

LEARNER, ENGINE = 0, 1  # process ids in a two-process run


@dataclass(frozen=True)
class Placement:
    """``role``: ``"both"`` (one process), ``"learner"`` or ``"engine"``;
    ``learner_device`` the device the RL state lives on (``None`` on the engine process);
    ``engine`` the engine's :class:`tml.parallel.TensorParallel` (``None``: the learner's
    device, the one-process default)."""

    role: str
    learner_device: object
    engine: object

    @property
    def remote(self) -> bool:
        return self.role != "both"


def place(c: RLConfig) -> Placement:
    """The placement of the module docstring; a layout the devices cannot hold is an error
    that says what to change."""
    from tml.kernels.collectives import ALGORITHMS

    m = c.engine_mesh
    if m.tensor < 1:
        raise ValueError(f"rl.engine_mesh.tensor must be >= 1, got {m.tensor}")
    if m.algorithm not in ALGORITHMS:
        raise ValueError(f"rl.engine_mesh.algorithm={m.algorithm!r}: choose one of {ALGORITHMS}")
    n = jax.process_count()
    if n == 1:
        devices = jax.devices()
        if m.tensor == 1:
            return Placement("both", devices[0], None)
        if len(devices) < 1 + m.tensor:
            raise ValueError(f"rl.engine_mesh.tensor={m.tensor} puts the engine on devices of its own: needs "
                             f"1 + {m.tensor} devices, this process has {len(devices)} (on CPU set "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={1 + m.tensor})")
        return Placement("both", devices[0], _tensor_parallel(devices[1:1 + m.tensor], m.algorithm))
    if n != 2:
        raise ValueError(f"tml rl runs as 1 process or 2 (learner + engine), got {n}: set "
                         "distributed.num_processes=2")
    engine_devices = [d for d in jax.devices() if d.process_index == ENGINE]
    if len(engine_devices) < m.tensor:
        raise ValueError(f"rl.engine_mesh.tensor={m.tensor}: the engine process has {len(engine_devices)} devices "
                         f"(on CPU start it with XLA_FLAGS=--xla_force_host_platform_device_count={m.tensor})")
    tp = _tensor_parallel(engine_devices[:m.tensor], m.algorithm)
    if jax.process_index() == LEARNER:
        return Placement("learner", jax.local_devices()[0], tp)
    return Placement("engine", None, tp)


def _tensor_parallel(devices, algorithm: str):
    from tml.parallel import MeshConfig, TensorParallel, make_mesh

    return TensorParallel(make_mesh(MeshConfig(data=1, tensor=len(devices)), devices=devices), algorithm=algorithm)


def make_engine(model, n_sessions: int, c: RLConfig, placement: Placement):
    """The run's engine (:func:`tml.rl.rollout.make_engine`'s settings) on the placement's
    engine mesh (``None``: on the model's device)."""
    from tml.sampler.engine import Engine
    from tml.sampler.sampling import SamplingParams

    return Engine(model, max_sessions=n_sessions, batch_buckets=(n_sessions,), max_context=c.max_context,
                  sampling=SamplingParams(temperature=c.temperature, top_p=c.top_p),
                  max_output_tokens=c.max_output_tokens, vocoder=False, mesh=placement.engine)


# ------------------------------------------------------------------ between two processes
def _allgather_bytes(raw: np.ndarray) -> np.ndarray:
    """uint8 [n] of this process → uint8 [processes, n] (same n everywhere)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(raw))


def send(obj, src: int):
    """``obj`` pickled on process ``src`` → that object on every process (one all-gather of
    the lengths, one of the bytes; the other processes' ``obj`` is ignored)."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(pickle.dumps(obj), np.uint8) if jax.process_index() == src else np.zeros(0, np.uint8)
    n = int(np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)[src])
    padded = np.zeros(n, np.uint8)
    padded[:min(raw.size, n)] = raw[:n]
    return pickle.loads(_allgather_bytes(padded)[src].tobytes())


def _raw_bytes(leaves) -> np.ndarray:
    return np.concatenate([np.ascontiguousarray(np.asarray(jax.device_get(x))).view(np.uint8).reshape(-1)
                           for x in leaves] or [np.zeros(0, np.uint8)])


def push_weights(state, src: int):
    """An ``nnx.State`` (any pytree of arrays) held by process ``src`` → the same bits as host
    arrays on every process. The other processes pass a tree of the same structure, shapes
    and dtypes (their values are ignored). One all-gather of all leaves' raw bytes."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    if jax.process_index() == src:
        raw = _raw_bytes(leaves)
    else:
        raw = np.zeros(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves), np.uint8)
    got = _allgather_bytes(raw)[src]
    out, at = [], 0
    for x in leaves:
        n = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        out.append(got[at:at + n].view(np.dtype(x.dtype)).reshape(x.shape))
        at += n
    return jax.tree_util.tree_unflatten(treedef, out)


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def save_state(ckpt, state, counters: dict) -> None:
    """Both processes together: the RL state's params, rest and optimizer state from host
    copies (process 0's values are written; see the module docstring), no rng (the loop
    never advances it: it is ``jax.random.key(rl.seed)``)."""
    ckpt.save(state.step, model=_host(state.model), opt_state=_host(state.opt_state),
              data_state={"counters": counters}, wait=True)


def restore_state(ckpt, state):
    """Both processes: :func:`save_state`'s checkpoint → (host state, data)."""
    from tml.train.state import TrainState

    r = ckpt.restore(model=_host(state.model), opt_state=_host(state.opt_state))
    return TrainState.create(r.model["params"], r.model["rest"], r.opt_state, state.rng, r.step), r.data_state


class RemoteEngine:
    """The learner's handle on the engine process. Every collective the learner enters is
    announced by a message first, so the engine process enters the same one (its loop in
    :func:`serve_engine` does what each message says)."""

    def __init__(self, c: RLConfig):
        self.c = c

    def start(self, restore: bool) -> None:
        send(("restore" if restore else "start", None), LEARNER)

    def check(self, handler) -> None:
        """The learner's preemption check, entered by both processes (the flags are OR-ed
        across them: a SIGTERM to either saves the step on both and exits both)."""
        send(("check", None), LEARNER)
        handler.check()

    def play(self, groups):
        """→ (episodes, dropped, the engine's compiled programs after playing them)."""
        send(("play", groups), LEARNER)
        return send(None, ENGINE)

    def push(self, state) -> dict:
        """New weights (``nnx.State``, params and rest) into the running engine → its ack:
        ``compiled_programs``, ``set_params_s`` and, with ``rl.check_push``, ``digest``."""
        send(("push", None), LEARNER)
        push_weights(state, LEARNER)
        return send(None, ENGINE)

    def save(self, state, counters: dict, ckpt) -> None:
        send(("save", None), LEARNER)
        save_state(ckpt, state, counters)

    def stop(self) -> None:
        send(("stop", None), LEARNER)


def serve_engine(cfg, placement: Placement) -> list[dict]:
    """The engine process of a two-process ``tml rl``: serve the learner's messages (restore,
    push, play, check, save) until it stops → [] (the learner logs the records)."""
    from flax import nnx

    from tml import kernels
    from tml.eval.checkpoint import load_model
    from tml.rl.learner import optimizer_for
    from tml.rl.loop import _canonical, canonical
    from tml.rl.rewards import check_weights
    from tml.rl.rollout import play
    from tml.sampler.snapshot import weights_digest
    from tml.train.checkpoint import Checkpointer
    from tml.train.preemption import install_preemption_handler
    from tml.train.state import TrainState

    c: RLConfig = cfg.rl
    weights = check_weights(c.rewards)
    model, _ = load_model(cfg.model, None, c.seed)  # the structure; the weights come from the learner
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # shapes and dtypes as the learner holds them (canonical: a fresh state's int64 leaves are int32 there)
    full = canonical(nnx.split(model)[1])
    like = _canonical(TrainState.create(params, rest, optimizer_for(c).init(params), jax.random.key(c.seed)))
    ckpt = Checkpointer(_ckpt_dir(c), model_config=cfg.model, async_save=False, keep_last=2)

    def save_with_learner():
        assert send(None, LEARNER)[0] == "save"
        save_state(ckpt, like, {})

    handler = install_preemption_handler(save_with_learner)
    engine = None
    try:
        with kernels.kernel_mode(c.kernel_mode):
            while True:
                kind, arg = send(None, LEARNER)
                if kind == "stop":
                    return []
                if kind == "restore":
                    restore_state(ckpt, like)
                elif kind == "save":
                    save_state(ckpt, like, {})
                elif kind == "check":
                    handler.check()
                elif kind == "play":
                    episodes, dropped = play(engine, arg, weights)
                    send((episodes, dropped, engine.compiled_programs()), ENGINE)
                elif kind == "push":
                    t = time.perf_counter()
                    new = push_weights(full, LEARNER)
                    if engine is None:
                        engine = make_engine(nnx.merge(graphdef, new), len(c.scenarios) * c.group_size, c,
                                             placement)
                    else:
                        engine.set_params(new)
                    jax.block_until_ready(engine.state)
                    send({"compiled_programs": engine.compiled_programs(), "set_params_s": time.perf_counter() - t,
                          "digest": weights_digest(engine.state) if c.check_push else None}, ENGINE)
    finally:
        handler.uninstall()
        ckpt.close()


def _ckpt_dir(c: RLConfig):
    from pathlib import Path

    return Path(c.run_dir) / "checkpoints"


__all__ = ["ENGINE", "LEARNER", "Placement", "RemoteEngine", "make_engine", "place", "push_weights",
           "restore_state", "save_state", "send", "serve_engine"]
