"""tml.train.metrics_log: JSONL content, resume truncation, wandb offline (no network),
progress bar, matmul peak and MFU."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tml.train.metrics_log import (
    MetricsLogger, WandbConfig, measure_matmul_peak_flops, mfu, read_metrics, truncate_after,
)

DISABLED = WandbConfig(mode="disabled")


def test_jsonl_one_flushed_line_per_step(tmp_path):
    with MetricsLogger(tmp_path, wandb=DISABLED, progress_bar=False) as log:
        log.log(1, {"loss": jnp.float32(2.5), "lr": np.float64(1e-3), "tokens": 4096,
                    "kind": "train", "nan_loss": float("nan"), "inf": jnp.inf})
        # readable while the run is still going (flushed per line)
        first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
        log.log(2, {"loss": jnp.array(1.25)})
    assert first["step"] == 1 and first["loss"] == 2.5 and first["lr"] == 1e-3
    assert first["tokens"] == 4096 and isinstance(first["tokens"], int)
    assert first["kind"] == "train" and first["nan_loss"] is None and first["inf"] is None
    assert isinstance(first["time"], float)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2] and recs[1]["loss"] == 1.25
    assert not (tmp_path / "wandb").exists()
    with MetricsLogger(tmp_path, wandb=DISABLED, progress_bar=False) as log:  # appends
        log.log(3, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="scalars"):
        MetricsLogger(tmp_path, wandb=DISABLED, progress_bar=False).log(4, {"v": np.ones(3)})


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, wandb=DISABLED, progress_bar=False) as log:
        for s in range(1, 6):
            log.log(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # torn line of a crash
    with MetricsLogger(tmp_path, wandb=DISABLED, progress_bar=False, start_step=3) as log:
        log.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert truncate_after(tmp_path / "missing.jsonl", 1) == 0


def test_only_process_zero_writes(tmp_path):
    with MetricsLogger(tmp_path / "run", wandb=WandbConfig(mode="offline"), is_main=False) as log:
        rec = log.log(1, {"loss": 1.0})
    assert rec["loss"] == 1.0 and not (tmp_path / "run").exists()


def test_progress_bar_shows_key_metrics(tmp_path, capsys):
    with MetricsLogger(tmp_path, wandb=DISABLED, total_steps=10, bar_metrics=("loss", "mfu")) as log:
        for s in range(1, 4):
            log.log(s, {"loss": 1.0 / s, "mfu": 0.25, "other": 7})
    err = capsys.readouterr().err
    assert "3/10" in err and "loss=0.3333" in err and "mfu=0.25" in err and "other" not in err


def test_wandb_offline_by_default_even_if_env_asks_online(tmp_path, monkeypatch):
    """The default config is offline; WANDB_MODE=online in the environment does not
    override it, and the server is unreachable anyway: the run is written under
    <run_dir>/wandb and its id kept for resumption."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert WandbConfig().mode == "offline"
    with MetricsLogger(tmp_path, config={"model": {"d": 8}}, progress_bar=False) as log:
        run = log._run
        assert run is not None and run.settings.mode == "offline"
        assert run.config["model"] == {"d": 8}
        for s in range(1, 4):
            log.log(s, {"loss": 1.0 / s, "skipped_nan": float("nan")})
        run_id = run.id
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    run_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1
    data = list(run_dirs[0].glob("*.wandb"))
    assert data and data[0].stat().st_size > 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with pytest.raises(ValueError, match="wandb.mode must be one of"):
        MetricsLogger(tmp_path, wandb=WandbConfig(mode="cloud"))


def test_matmul_peak_and_mfu():
    peak = measure_matmul_peak_flops(sizes=(128, 256), repeats=2, min_seconds=0.01)
    assert math.isfinite(peak) and 1e8 < peak < 1e14  # a CPU core does >= 0.1 GFLOP/s
    assert mfu(2e9, 0.5, 8e9) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)
