"""Per-step metrics: local JSONL, wandb (offline unless the user opts in), a progress bar;
and the machine's measured matmul peak for MFU.

``<run_dir>/metrics.jsonl`` gets one JSON object per logged step,
``{"step": 12, "time": 1718000000.1, "loss": 2.31, ...}``, appended and flushed at once (a
crash loses nothing already logged). Non-finite values are written as ``null`` (strict
JSON; a NaN loss shows up as a missing value). On resume pass ``start_step``: lines of
steps after it (logged after the checkpoint being resumed) are dropped, so the file reads as
one run.

wandb: ``mode`` is ``"offline"`` (default: the run is written under
``<run_dir>/wandb/`` and can be pushed later with ``wandb sync``), ``"online"`` (the user
opted in) or ``"disabled"`` (wandb is not even imported). The run id is kept in
``<run_dir>/wandb_run_id`` so a resumed job continues the same wandb run.

Only process 0 writes (JSONL, wandb, progress bar); other processes' loggers are no-ops.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tml.train.config import LoggingConfig, WandbConfig  # noqa: F401  (re-exported)

METRICS_FILE = "metrics.jsonl"
WANDB_MODES = ("offline", "online", "disabled")


def _to_scalar(v: Any) -> Any:
    """Numbers and 0-d arrays → finite float/int or None; strings/bools pass through."""
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"metric values must be scalars, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.integer):
        return int(a.reshape(()))
    f = float(a.reshape(()))
    return f if math.isfinite(f) else None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _is_main_process() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # pragma: no cover - jax always present
        return True


def truncate_after(path: str | os.PathLike, step: int) -> int:
    """Drop lines with ``"step" > step`` from a JSONL file (atomic rewrite); returns how
    many were dropped. Unparseable lines (a torn last line after a crash) are dropped too."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """``log(step, metrics)`` → ``metrics.jsonl`` + wandb + progress bar.

    ``config``: the run's full config (dict / dataclass / OmegaConf), recorded in wandb.
    ``total_steps``: the progress bar's length. ``start_step``: see the module docstring.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        wandb: WandbConfig | None = None,
        config: Any = None,
        total_steps: int | None = None,
        start_step: int = 0,
        progress_bar: bool = True,
        bar_metrics: Sequence[str] = ("loss", "lr", "tokens_per_s", "mfu"),
        is_main: bool | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.is_main = _is_main_process() if is_main is None else is_main
        self.wandb_cfg = wandb or WandbConfig()
        if self.wandb_cfg.mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode must be one of {WANDB_MODES}, got {self.wandb_cfg.mode!r}")
        self.bar_metrics = tuple(bar_metrics)
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._run = None
        self._bar = None
        self._last_step = start_step
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            truncate_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if self.wandb_cfg.mode != "disabled":
            self._run = self._start_wandb(config, resuming=start_step > 0)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    @classmethod
    def from_config(cls, cfg: LoggingConfig, run_dir: str | os.PathLike, **kw) -> "MetricsLogger":
        return cls(run_dir, wandb=cfg.wandb, progress_bar=cfg.progress_bar,
                   bar_metrics=cfg.bar_metrics, **kw)

    def _start_wandb(self, config: Any, resuming: bool):
        import wandb

        from tml.train.checkpoint import config_to_dict

        c = self.wandb_cfg
        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        try:
            cfg_dict = config_to_dict(config) if config is not None else None
        except TypeError:
            cfg_dict = None
        return wandb.init(
            mode=c.mode, dir=str(self.run_dir), project=c.project, entity=c.entity,
            name=c.name or self.run_dir.name, group=c.group, tags=list(c.tags) or None,
            config=cfg_dict, id=run_id, resume="allow",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Record ``metrics`` (scalars: floats, ints, 0-d arrays) for ``step``; returns the
        record written. Pulls device values to the host, so call it every ``log_every``
        steps rather than every step on accelerators."""
        record = {"step": int(step), "time": time.time()}
        record.update({k: _to_scalar(v) for k, v in metrics.items()})
        if not self.is_main:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._run is not None:
            self._run.log({k: v for k, v in record.items() if k not in ("step", "time")
                           and v is not None}, step=int(step))
        if self._bar is not None:
            self._bar.update(max(0, int(step) - self._last_step))
            post = {k: _fmt(record[k]) for k in self.bar_metrics if k in record}
            self._bar.set_postfix(post, refresh=False)
        self._last_step = max(self._last_step, int(step))
        return record

    def close(self) -> None:
        """Flush and close the JSONL file, finish the wandb run, close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``<run_dir>/metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- MFU


def measure_matmul_peak_flops(dtype=None, *, sizes: Sequence[int] = (512, 1024, 2048),
                              repeats: int = 5, min_seconds: float = 0.05) -> float:
    """The machine's measured matmul throughput in FLOP/s: jitted square ``[n, n] @ [n, n]``
    products (2 n^3 FLOPs each) on the default device, best of ``repeats`` timings per size,
    max over ``sizes``. Each timing runs the product enough times to last ``min_seconds``.
    Used as the denominator of MFU (the achievable, not the datasheet, peak)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    best = 0.0
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), dtype)
        b = jax.random.normal(kb, (n, n), dtype)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()  # compile + warm up
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        once = max(time.perf_counter() - t0, 1e-9)
        reps = max(1, int(min_seconds / once))
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(reps):
                out = f(a, b)
            out.block_until_ready()
            dt = (time.perf_counter() - t0) / reps
            best = max(best, 2.0 * n**3 / dt)
    return best


def mfu(model_flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (a fraction, 0..1)."""
    if step_seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"step_seconds and peak_flops must be > 0, got {step_seconds}, {peak_flops}")
    return model_flops_per_step / step_seconds / peak_flops


__all__ = [
    "MetricsLogger", "LoggingConfig", "WandbConfig", "read_metrics", "truncate_after",
    "measure_matmul_peak_flops", "mfu", "METRICS_FILE",
]
