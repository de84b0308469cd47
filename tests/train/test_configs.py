"""The tml.train dataclasses work as Hydra structured configs: typos and wrong types are
rejected with the key named; the resulting objects drive the code."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tml.train import (
    CheckpointConfig, DistributedConfig, LoggingConfig, OptimConfig, learning_rate_at,
    make_optimizer, plan_distributed,
)


@pytest.mark.parametrize("schema", [OptimConfig, CheckpointConfig, DistributedConfig, LoggingConfig])
def test_structured_config_round_trip_and_typos(schema):
    base = OmegaConf.structured(schema)
    obj = OmegaConf.to_object(base)
    assert isinstance(obj, schema) and obj == schema()
    with pytest.raises(ConfigKeyError, match="not_a_key"):
        OmegaConf.merge(base, OmegaConf.from_dotlist(["not_a_key=1"]))


def test_overrides_are_typed_and_used():
    base = OmegaConf.structured(OptimConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.from_dotlist(
        ["lr=0.01", "warmup_steps=5", "no_decay_patterns=[bias]"])))
    assert learning_rate_at(cfg, 4) == pytest.approx(0.01)
    make_optimizer(cfg)
    with pytest.raises(ValidationError, match="warmup_steps"):
        OmegaConf.merge(base, OmegaConf.from_dotlist(["warmup_steps=soon"]))
    log = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoggingConfig),
                                              OmegaConf.from_dotlist(["wandb.mode=online"])))
    assert log.wandb.mode == "online"
    dist = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DistributedConfig),
                                               OmegaConf.from_dotlist([
                                                   "coordinator_address=h:1", "num_processes=2",
                                                   "process_id=1"])))
    assert plan_distributed(dist, {}).source == "explicit"
