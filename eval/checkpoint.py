"""The model ``tml eval`` runs: restored from a training checkpoint, or freshly initialised.

``eval.checkpoint`` may name any of the three directories a training run leaves
(:func:`resolve`):

* the **run dir** (``runs/tiny``, the default: ``train.run_dir`` of the default recipe),
  which holds ``checkpoints/``;
* the **checkpoints dir** (``runs/tiny/checkpoints``), which holds one folder per step;
* a **step dir** (``runs/tiny/checkpoints/300``): that step instead of the newest.

``none`` (or ``eval.policy=untrained``) evaluates a freshly initialised model
(``InteractionModel(cfg.model, rngs=nnx.Rngs(train.seed))``, the trainer's own step-0
model).

The weights are read through :class:`tml.train.checkpoint.Checkpointer`, item ``model``
only (``{"params": nnx.Param state, "rest": the other model state}``, as
:class:`tml.train.state.TrainState` saves it; optimizer, RNG and loader state are not
read), onto a model built from ``cfg.model`` (as the trainer does: its array values are
replaced, its host-side leaves keep their dtype). A checkpoint written by another model config is refused
before any array is read (:class:`CheckpointModelMismatch`): the message names the
checkpoint, every differing key with both values, and what to pass -- ``model=<recipe>``
when a recipe in ``recipes/model/`` has the checkpoint's config, else the
``model.<key>=<value>`` overrides.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

NONE = ("none", "")


class CheckpointModelMismatch(ValueError):
    """``eval.checkpoint`` was written by a model config other than ``cfg.model``."""


@dataclass(frozen=True)
class Loaded:
    """Where the evaluated weights came from: ``checkpoint`` (the checkpoints dir) and
    ``step``, or ``None`` / ``None`` for a fresh model initialised with ``seed``."""

    checkpoint: str | None
    step: int | None
    seed: int | None

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"untrained (fresh init, seed {self.seed})"
        return f"{self.checkpoint} step {self.step}"


def _is_step_dir(p: Path) -> bool:
    return p.name.isdigit() and (p / "model").is_dir()


def resolve(path: str) -> tuple[Path, int | None]:
    """``eval.checkpoint`` -> (checkpoints dir, step or None for the newest); see the
    module docstring for the accepted directories. Raises FileNotFoundError naming the
    path and what was looked for."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"eval.checkpoint={path!r} does not exist: pass a training run dir (holding checkpoints/), its "
            "checkpoints/ dir or one step dir (checkpoints/<step>); `make run` or `tml train` writes runs/tiny; "
            "eval.checkpoint=none evaluates an untrained model")
    if _is_step_dir(p):
        return p.parent, int(p.name)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    steps = sorted(int(d.name) for d in p.iterdir() if _is_step_dir(d)) if p.is_dir() else []
    if not steps:
        raise FileNotFoundError(
            f"eval.checkpoint={path!r}: no checkpoint step in {p} (looked for <step>/model folders); pass a run "
            "dir, its checkpoints/ dir or a step dir, or eval.checkpoint=none for an untrained model")
    return p, None


def _recipe_with(saved: dict) -> str | None:
    """The name of the model recipe whose config equals the checkpoint's, if any."""
    from omegaconf import OmegaConf

    import tml.recipes
    from tml.model.config import ModelConfig
    from tml.train.checkpoint.fingerprint import checkpointed_model_config

    for f in sorted((Path(tml.recipes.__file__).parent / "model").glob("*.yaml")):
        raw = OmegaConf.load(f)
        raw.pop("defaults", None)
        try:
            mc = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
        except Exception:  # noqa: BLE001 -- a recipe that does not compose is no suggestion
            continue
        if checkpointed_model_config(mc) == saved:
            return f.stem
    return None


def check_model_config(ckpt_dir: Path, step: int, meta: dict, model_cfg) -> None:
    """Refuse a checkpoint whose ``meta.model_config`` differs from ``model_cfg``
    (module docstring); return silently when they agree."""
    from tml.train.checkpoint import config_diff, flatten_config
    from tml.train.checkpoint.fingerprint import checkpointed_model_config

    saved = checkpointed_model_config(meta.get("model_config", {}))
    diff = config_diff(flatten_config(saved), flatten_config(checkpointed_model_config(model_cfg)))
    if not diff:
        return
    lines = [f"  {k}: checkpoint {a!r}, current {b!r}" for k, a, b in diff]
    recipe = _recipe_with(saved)
    if recipe is not None:
        fix = f"pass model={recipe} (the model recipe with the checkpoint's config)"
    else:
        over = " ".join(f"model.{k}={json.dumps(a)}" for k, a, _ in diff if a != "<absent>")
        fix = f"pass the checkpoint's model config: {over}"
    raise CheckpointModelMismatch(
        f"eval.checkpoint: {ckpt_dir / str(step)} was written by another model config than this run's "
        f"model (name {getattr(model_cfg, 'name', '?')!r}). Differing keys:\n" + "\n".join(lines)
        + f"\nTo evaluate it, {fix}; or point eval.checkpoint at a checkpoint of this model.")


def load_model(model_cfg, checkpoint: str | None, seed: int = 0):
    """-> (``InteractionModel``, :class:`Loaded`). ``checkpoint`` None / ``"none"``: fresh
    weights from ``seed``; else restored (module docstring)."""
    import jax
    from flax import nnx

    from tml.model.model import InteractionModel
    from tml.train.checkpoint import Checkpointer

    model_cfg = model_cfg.validate() if hasattr(model_cfg, "validate") else model_cfg
    if checkpoint is None or str(checkpoint).lower() in NONE:
        return InteractionModel(model_cfg, rngs=nnx.Rngs(seed)), Loaded(None, None, seed)
    ckpt_dir, step = resolve(str(checkpoint))
    absl = logging.getLogger("absl")  # Orbax logs every restore step at INFO, which Hydra prints
    level = absl.level
    absl.setLevel(logging.WARNING)
    try:
        ckpt = Checkpointer.open_read_only(ckpt_dir, model_config=model_cfg)  # a trainer may be saving there
        try:
            step = ckpt.latest_step() if step is None else step
            check_model_config(ckpt_dir, step, ckpt.read_meta(step), model_cfg)  # before building anything
            # a concrete model as the restore target, as the trainer restores: its host (numpy)
            # leaves, e.g. the hMLP's int64 scale plan, come back as numpy of the same dtype
            # (nnx.eval_shape would make them int32 device arrays: another state signature)
            graphdef, params, rest = nnx.split(InteractionModel(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
            r = ckpt.restore(step, model={"params": params, "rest": rest})
        finally:
            ckpt.close()
    finally:
        absl.setLevel(level)
    model = nnx.merge(graphdef, r.model["params"], r.model["rest"])
    jax.block_until_ready(nnx.state(model))
    return model, Loaded(str(ckpt_dir), int(r.step), None)


__all__ = ["CheckpointModelMismatch", "Loaded", "check_model_config", "load_model", "resolve"]
