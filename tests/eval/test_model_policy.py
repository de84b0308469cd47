"""``eval.policy=model|untrained``: the sampler engine as a policy, and loading its checkpoint.

The tiny test model (untrained, a small page pool) streams held-out scenarios through the
engine into valid timelines and an eval.json; a checkpoint of another model config is
refused before any array is read, naming the checkpoint, the differing keys and the
``model=`` to pass; one session's bad input skips only that sample, and the other
sessions emit exactly what they emit without it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from flax import nnx

from tests.model.tiny_model import CFG, tiny_model
from tml.eval.checkpoint import CheckpointModelMismatch, load_model, resolve
from tml.eval.config import EvalConfig
from tml.eval.policies import MicroTurnInput, ModelPolicy, ModelSampling, Sample, stream
from tml.eval.run import make_policy, run
from tml.eval.scenarios import MicroTurnOutput

SAMPLING = ModelSampling(max_output_tokens=6, max_context=1024)  # 6: room to speak (<speak> + 4 frames + <end>)
ENGINE = dict(chunk_buckets=(32,), patch_buckets=(4,))            # one prefill program


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def bits(tree) -> list[tuple[str, np.ndarray]]:
    """Every leaf as (dtype, raw bits): float32 weights viewed as uint32, other leaves as bytes."""
    import jax

    out = []
    for x in jax.tree_util.tree_leaves(tree):
        a = np.asarray(x)
        out.append((str(a.dtype), a.view(np.uint32) if a.dtype == np.float32 else a.view(np.uint8)))
    return out


def same_bits(a, b) -> bool:
    return len(a) == len(b) and all(da == db and np.array_equal(x, y) for (da, x), (db, y) in zip(a, b))


# ------------------------------------------------------------------ scenarios -> eval.json
def test_model_policy_streams_scenarios_into_valid_timelines_and_eval_json(model, tmp_path):
    cfg = EvalConfig(policy="model", scenarios=["typed_text", "time_speak"], per_scenario=1, batch_size=2,
                     out=str(tmp_path / "{policy}"), progress=False, plots=False)
    policy = ModelPolicy(model, name="model", max_sessions=2, sampling=SAMPLING, **ENGINE)
    result = run(cfg, policy, quiet=True)
    saved = json.loads((tmp_path / "model" / "eval.json").read_text())
    assert saved["policy"] == "model" and not saved["errors"], saved["errors"]
    assert [s["scenario"] for s in saved["samples"]] == ["typed_text", "time_speak"]
    for s in saved["samples"]:
        tasks = {row["task"] for row in s["tasks"]}
        # its scenario's scorer ran on a valid Timeline (score() raises on an invalid one),
        # beside the activity and teacher-forced loss rows
        assert {"activity", "target_nll"} <= tasks and len(tasks) >= 3, tasks
        nll = next(r for r in s["tasks"] if r["task"] == "target_nll")
        assert all(np.isfinite(nll[k]) and nll[k] > 0 for k in ("text", "speech", "control"))
    assert result["timing"]["micro_turns"] == sum(s["micro_turns"] for s in saved["samples"]) == 25 + 36
    assert policy.engine.pool.sessions() == []  # every session closed, its pages returned
    policy.engine.pool.check()
    act = result["tasks"]["activity"]
    assert 0.0 <= act["speaking_rate"] <= 1.0 and act["n"] == 2


def test_untrained_policy_is_the_fresh_model_of_train_seed(tmp_path):
    p = make_policy(EvalConfig(policy="untrained", batch_size=2), CFG, seed=0)
    assert p.name == "untrained" and p.loaded.checkpoint is None and p.loaded.seed == 0
    assert same_bits(bits(nnx.state(p.model)), bits(nnx.state(tiny_model())))
    p1 = make_policy(EvalConfig(policy="model", checkpoint="none", batch_size=2), CFG, seed=1)
    assert p1.name == "untrained" and p1.loaded.seed == 1
    with pytest.raises(SystemExit, match="needs the model config"):
        make_policy(EvalConfig(policy="model"))


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run dir holding one checkpoint (step 7) of the test model, as the trainer writes it."""
    from tml.train.checkpoint import Checkpointer

    run_dir = tmp_path_factory.mktemp("run")
    m = tiny_model()
    _, params, rest = nnx.split(m, nnx.Param, ...)
    with Checkpointer(run_dir / "checkpoints", model_config=CFG) as ck:
        ck.save(7, model={"params": params, "rest": rest}, wait=True)
    return run_dir, m


def test_checkpoint_loads_from_run_checkpoints_or_step_dir(checkpoint):
    run_dir, m = checkpoint
    want = bits(nnx.state(m))
    for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "7"):
        loaded, info = load_model(CFG, str(path))
        assert info.step == 7 and info.checkpoint == str(run_dir / "checkpoints")
        got = bits(nnx.state(loaded))
        assert same_bits(got, want)
    assert resolve(str(run_dir / "checkpoints" / "7")) == (run_dir / "checkpoints", 7)
    with pytest.raises(FileNotFoundError, match="eval.checkpoint=none"):
        resolve(str(run_dir / "missing"))
    with pytest.raises(FileNotFoundError, match="no checkpoint step"):
        resolve(str(run_dir.parent))


def test_checkpoint_of_another_model_config_is_refused_naming_the_keys(checkpoint):
    run_dir, _ = checkpoint
    other = replace(CFG, d_model=32, n_layers=1)
    with pytest.raises(CheckpointModelMismatch) as e:
        load_model(other, str(run_dir))
    msg = str(e.value)
    assert str(run_dir / "checkpoints" / "7") in msg
    assert "d_model: checkpoint 64, current 32" in msg and "n_layers: checkpoint 2, current 1" in msg
    assert "model.d_model=64" in msg and "model.n_layers=2" in msg
    # through `tml eval`: the same message as a clean exit
    with pytest.raises(SystemExit, match="d_model: checkpoint 64, current 32"):
        make_policy(EvalConfig(policy="model", checkpoint=str(run_dir)), other)


def test_mismatch_names_the_model_recipe_holding_the_checkpoints_config(tmp_path, checkpoint):
    """A checkpoint whose config is a recipe's (here: `tiny`, the default) gets `model=tiny` as
    the fix. The guard reads only the checkpoint's meta, so the arrays can be the test model's."""
    from omegaconf import OmegaConf

    import tml.recipes
    from tml.model.config import ModelConfig
    from tml.train.checkpoint import Checkpointer

    raw = OmegaConf.load(f"{tml.recipes.__path__[0]}/model/tiny.yaml")
    raw.pop("defaults", None)
    tiny_recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
    _, m = checkpoint
    _, params, rest = nnx.split(m, nnx.Param, ...)
    with Checkpointer(tmp_path / "checkpoints", model_config=tiny_recipe) as ck:
        ck.save(1, model={"params": params, "rest": rest}, wait=True)
    with pytest.raises(CheckpointModelMismatch, match="pass model=tiny"):
        load_model(CFG, str(tmp_path))


# ------------------------------------------------------------------ one bad session
def _samples(n_micro_turns: int, bad: str | None = None, bad_at: int = 2) -> list[Sample]:
    """Three short random samples; ``bad`` names one whose audio at ``bad_at`` is 3,000 samples."""
    def inputs(seed: int, broken: bool):
        rng = np.random.default_rng(seed)
        for t in range(n_micro_turns):
            audio = (0.1 * rng.standard_normal(3000 if broken and t == bad_at else 3200)).astype(np.float32)
            yield MicroTurnInput(t, audio, np.zeros((4, 80), np.uint8), typed="hi" if t == 1 else "")

    return [Sample(name, seed, n_micro_turns, (lambda s=seed, b=(name == bad): inputs(s, b)))
            for name, seed in (("a", 1), ("b", 2), ("c", 3))]


def test_one_sessions_bad_input_skips_only_that_sample(model):
    def outputs(bad):
        policy = ModelPolicy(model, max_sessions=2, sampling=SAMPLING, **ENGINE)  # c joins when a slot frees
        return {d.sample.sample_id: d for d in stream(policy, _samples(5, bad), batch_size=2)}, policy

    clean, _ = outputs(None)
    broken, policy = outputs("b")
    assert all(d.error is None and len(d.outputs) == 5 for d in clean.values())
    err = broken["b"].error
    assert err.startswith("b: micro-turn 2:") and "3200 mono samples" in err, err
    for sid in ("a", "c"):
        assert broken[sid].error is None
        # as if b had never been appended (c joins at tick 3 here, at tick 5 without the error)
        assert broken[sid].outputs == clean[sid].outputs
        assert all(isinstance(o, MicroTurnOutput) for o in broken[sid].outputs)
    assert not policy._sid and policy.engine.pool.sessions() == []  # every session closed, b included
    policy.engine.pool.check()
