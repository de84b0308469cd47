"""The ``recipes/rl/`` options compose into valid ``rl`` configs, and the demonstration
recipe plays what the issue asks of it: minutes-long episodes (>= 60 s) with the user
reacting, from the ``make run`` checkpoint, on the batch-invariant kernels, rewards that
are eval scorer names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tml.config import register_configs
from tml.rl.loop import validate
from tml.rl.rewards import REWARDS

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "recipes" / "rl").glob("*.yaml"))


def rl_config(recipe: str):
    register_configs()
    with initialize_config_module("tml.recipes", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[f"+rl={recipe}"])).rl


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_rl_recipe_composes_and_validates(recipe):
    validate(rl_config(recipe))


def test_the_demonstration_recipe_plays_minutes_long_reacting_episodes_from_make_run():
    c = rl_config("demo")
    assert c.episode_seconds >= 60 and c.user_reacts and c.credit == "micro_turn"
    assert c.init_checkpoint == "runs/tiny" and c.kernel_mode == "batch_invariant"
    assert len(c.rewards) >= 2 and set(c.rewards) <= set(REWARDS)
    assert c.speech_weight == 0.0 and c.row_tokens and c.learn_rows == 1
