"""The training state: everything a step reads and writes, and a checkpoint holds.

    state = TrainState.create(params, rest, opt_state, rng)      # step 0
    out = step_fn(state, batch)                                   # a StepOutput
    out.state.step == 1

:class:`TrainState` is a pytree (a ``flax.struct`` dataclass) of the model's parameters
(``params``: the ``nnx.Param`` state), the model's other state (``rest``: the MoE balance
biases ...), the optimizer state and the RNG key; ``step`` (updates done) is static
metadata, a host ``int``: the step programs never read it (the optimizer counts its own
updates inside ``opt_state``), so it costs no recompilation and no device round trip.

A checkpoint stores it in the items ``model`` = ``{"params", "rest"}``, ``opt_state``,
``rng`` (and the loader position ``data`` and ``meta``, which the checkpointer adds): the
on-disk format of :class:`tml.train.checkpoint.Checkpointer`, unchanged by this class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """``params`` / ``rest`` / ``opt_state`` / ``rng`` (pytree leaves) at ``step`` (static)."""

    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array
    step: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(cls, params, rest, opt_state, rng, step: int = 0) -> TrainState:
        return cls(params=params, rest=rest, opt_state=opt_state, rng=rng, step=int(step))

    @property
    def model(self) -> dict:
        """The checkpoint's ``model`` item: ``{"params": ..., "rest": ...}``."""
        return {"params": self.params, "rest": self.rest}

    def save(self, ckpt, *, data_state=None, metrics=None, wait: bool = False) -> None:
        """Checkpoint this state as step ``self.step`` (``data_state``: the loader's position
        after the batches this state has seen)."""
        ckpt.save(self.step, model=self.model, opt_state=self.opt_state, rng=self.rng,
                  data_state=data_state, metrics=metrics, wait=wait)

    def restore(self, ckpt, *, step: int | None = None,
                merge_data_states: Callable[[list], Any] | None = None) -> tuple[TrainState, Any]:
        """The checkpointed state (latest, or ``step``) restored onto this state's structure
        and shardings (this run's mesh) → (state, saved loader state)."""
        r = ckpt.restore(step, model=self.model, opt_state=self.opt_state, rng=self.rng,
                         merge_data_states=merge_data_states)
        restored = TrainState.create(r.model["params"], r.model["rest"], r.opt_state, r.rng, r.step)
        return restored, r.data_state


class StepOutput(NamedTuple):
    """What one training step returns: the new state, the metrics (per-kind losses and token
    counts, ``grad_norm``; scalars), and the MoE expert load beside them."""

    state: TrainState
    metrics: dict
    expert_load: jax.Array       # [n_moe_layers, E]: fraction of routed slots per expert


__all__ = ["StepOutput", "TrainState"]
