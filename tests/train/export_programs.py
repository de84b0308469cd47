"""Shapes-only builders for lowering tml programs for GPU/TPU on a CPU host (jax.export).

``export_program(fn, platform, *shapes)`` traces ``fn`` as if for ``platform``
(:func:`tml.kernels.compile_target`: ``impl="auto"`` = Pallas, Triton for cuda, Mosaic for
tpu, compiled rather than interpreted) and exports it. ``train_step_shapes(cfg, ...)``
gives the training step of a model config and the abstract arguments of its two
programs (gradients, update), without allocating a parameter. The sampler's tick is to be
exported with the same ``export_program`` (see the module docstring of
tests/train/test_export.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import yaml
from flax import nnx
from jax import export as jax_export

from tml import kernels
from tml.kernels.pallas.common import export_disabled_checks
from tml.model.config import ModelConfig
from tml.model.loss import LossWeights
from tml.model.model import InteractionModel
from tml.recipes import __file__ as _recipes_init
from tml.train.optim import OptimConfig, make_optimizer
from tml.train.step import make_train_step


def recipe_model(name: str, **overrides) -> ModelConfig:
    """``recipes/model/<name>.yaml`` as a ModelConfig (the schema's defaults for the rest)."""
    from pathlib import Path

    d = yaml.safe_load((Path(_recipes_init).parent / "model" / f"{name}.yaml").read_text())
    d.pop("defaults", None)
    return dataclasses.replace(ModelConfig(**d), **overrides)


def export_program(fn, platform: str, *shapes) -> jax_export.Exported:
    """``jax.export`` of ``jax.jit(fn)`` for ``platform``, traced for that platform."""
    with kernels.compile_target(platform):
        return jax_export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=export_disabled_checks(platform))(*shapes)


@dataclasses.dataclass
class StepShapes:
    step: object                  # tml.train.step.TrainStep
    gradients_args: tuple         # (params, rest, batch) abstract
    update_args: tuple            # (params, rest, opt_state, grads, expert_load) abstract


def abstract_rows(rows: dict) -> dict:
    """numpy rows [B, ...] → ShapeDtypeStructs."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in rows.items()}


def train_step_shapes(cfg: ModelConfig, batch: dict, *, micro_batches: int = 1) -> StepShapes:
    """The training step of ``cfg`` and the abstract arguments of its two programs.

    batch: abstract rows (:func:`abstract_rows`)."""
    model = nnx.eval_shape(lambda: InteractionModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=1, total_steps=6))
    opt_state = jax.eval_shape(tx.init, params)
    step = make_train_step(graphdef, tx, LossWeights(), cfg.balance_rate, micro_batches=micro_batches)
    grads, _, load = jax.eval_shape(step.gradients, params, rest, batch)
    return StepShapes(step, (params, rest, batch), (params, rest, opt_state, grads, load))


def custom_calls(exported: jax_export.Exported) -> set[str]:
    """The custom-call targets of an exported module (e.g. ``tpu_custom_call``)."""
    import re

    return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)\(", exported.mlir_module()))


__all__ = ["StepShapes", "abstract_rows", "custom_calls", "export_program", "jnp", "recipe_model",
           "train_step_shapes"]
