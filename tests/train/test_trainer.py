"""The trainer end to end on a tiny corpus: losses fall, runs are deterministic,
resuming from a checkpoint continues bitwise identically (raw bits of every parameter),
and no failure after a completed step loses it."""

import jax
import pytest

import tml.train.trainer as trainer_module
from tests.train.trainer_fixtures import (
    STEPS,
    build_corpus,
    config,
    final_params,
    same_bits,
    with_train,
)
from tml.train.metrics_log import read_metrics
from tml.train.trainer import Hook, Trainer, train


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical programs across the runs below compile once."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    cfg = config(corpus, tmp_path_factory.mktemp("straight"))
    summary = train(cfg)
    return cfg, summary


def test_losses_fall_and_metrics_are_logged(straight):
    cfg, summary = straight
    assert summary["steps"] == STEPS
    assert summary["last_loss"] < summary["first_loss"]
    rows = read_metrics(cfg.train.run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss_text", "loss_speech", "loss_control", "grad_norm", "lr", "tokens_per_s"):
        assert all(r[key] is not None for r in rows), key


def test_same_recipe_and_seed_give_identical_parameters(straight, corpus, tmp_path):
    cfg, _ = straight
    again = config(corpus, tmp_path / "again")
    train(again)
    step_a, a = final_params(cfg)
    step_b, b = final_params(again)
    assert step_a == step_b == STEPS and same_bits(a, b)


def test_resume_continues_bitwise_identically(straight, corpus, tmp_path):
    cfg, _ = straight
    half = config(corpus, tmp_path / "resumed", steps=STEPS // 2)
    train(half)
    resumed = with_train(half, steps=STEPS)
    summary = train(resumed)
    assert summary["steps"] == STEPS
    _, a = final_params(cfg)
    _, b = final_params(resumed)
    assert same_bits(a, b)


def test_a_different_seed_gives_different_parameters(straight, corpus, tmp_path):
    cfg, _ = straight
    other = config(corpus, tmp_path / "seed1", steps=1, seed=1)
    train(other)
    straight1 = config(corpus, tmp_path / "seed0", steps=1)
    train(straight1)
    assert not same_bits(final_params(other)[1], final_params(straight1)[1])


def test_a_corpus_without_held_out_split_trains_without_evaluation(tmp_path, capsys):
    """``data.eval_conversations: 0`` (the ``data=moshi`` default) with evaluation on: said
    once at start-up, then every step runs and the final checkpoint is saved."""
    corpus = build_corpus(tmp_path / "corpus", eval_conversations=0)
    cfg = config(corpus, tmp_path / "run", steps=3, eval_every=2)
    summary = train(cfg)
    out = capsys.readouterr().out
    assert out.count("evaluation off") == 1 and "no held-out split" in out
    assert "data.eval_conversations > 0" in out
    assert summary["steps"] == 3 and final_params(cfg)[0] == 3
    assert not any(k.startswith("eval_") for r in read_metrics(cfg.train.run_dir) for k in r)


def test_a_failing_hook_keeps_the_last_completed_step(corpus, tmp_path):
    """A hook raising after step 2 (checkpoints every 3): the error leaves train() and the
    checkpoint of step 2 exists, bitwise the state of a run stopped there."""
    cfg = config(corpus, tmp_path / "failing")

    def boom(info):
        raise RuntimeError(f"logger down at step {info.step}")

    t = Trainer(cfg)
    t.hooks.append(Hook.every(2, boom))
    with pytest.raises(RuntimeError, match="logger down at step 2"):
        t.train()
    step, got = final_params(cfg)
    stopped = config(corpus, tmp_path / "two", steps=2)
    train(stopped)
    assert step == 2 and same_bits(got, final_params(stopped)[1])
    # and the run resumes from it to the end, as if never interrupted
    assert train(cfg)["steps"] == STEPS


def test_a_failing_evaluation_keeps_the_trained_steps(corpus, tmp_path, monkeypatch):
    """The user's bug: an error in the final evaluation used to leave checkpoints/ empty."""
    def broken(*args):
        raise ValueError("eval split unreadable")

    monkeypatch.setattr(trainer_module, "evaluate", broken)
    cfg = config(corpus, tmp_path / "evalfail", steps=2, eval_every=100)
    with pytest.raises(ValueError, match="eval split unreadable"):
        train(cfg)
    assert final_params(cfg)[0] == 2
