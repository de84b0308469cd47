"""Compare ``tml rl`` runs: reward and drift curves (plots + JSON) and the alignment check.

    python -m tml.rl.report runs/rl_demo runs/rl_demo_standard [--out runs/rl_demo/report]
        [--eval-before DIR --eval-after DIR ...]

Each run directory holds ``metrics.jsonl`` (one record per step, :mod:`tml.rl.loop`) and
``rl_config.json`` (the run's ``rl`` config, for its kernel mode). Written to ``--out``:

* ``rewards.png``: ``reward/mean`` and every ``reward/<name>`` per step, one panel each,
  one line per run (raw, and a 3-step moving mean);
* ``drift.png``: the eight ``mismatch/*`` metrics per step (log scale where they are
  differences), one line per run;
* ``report.json``: per run its mode, steps, every per-step curve, the first / last
  ``window`` steps' mean of each reward and the gain, and the **alignment check** of a
  ``batch_invariant`` run: every step's ``mismatch/is_ratio_min`` / ``_max`` (trainer vs
  sampler) and ``rl/ratio_min`` / ``_max`` (the PPO ratio of the update's first epoch)
  exactly 1.0, ``bitwise_equal_fraction`` exactly 1.0 — the command exits 1 if a
  ``batch_invariant`` run fails it;
* with ``--eval-before`` / ``--eval-after`` (``tml eval`` output dirs, ``eval.json``): a
  table of every task metric before and after, in the JSON and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tml.sampler.divergence import METRICS

RATIO_KEYS = ("mismatch/is_ratio_min", "mismatch/is_ratio_max", "rl/ratio_min", "rl/ratio_max")


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run dir → {"name", "mode", "records"}; a clear error when it is not a tml rl run."""
    d = Path(run_dir)
    metrics = d / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"{d}: no metrics.jsonl — pass a tml rl run directory (rl.run_dir)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if "reward/mean" in r]
    by_step = {r["step"]: r for r in records}      # a resumed run may log a step again: keep the last
    cfg_path = d / "rl_config.json"
    mode = json.loads(cfg_path.read_text()).get("kernel_mode", "?") if cfg_path.exists() else "?"
    return {"name": d.name, "dir": str(d), "mode": mode, "records": [by_step[s] for s in sorted(by_step)]}


def alignment_check(run: dict[str, Any]) -> dict[str, Any]:
    """Whether every step's importance ratios (both kinds) are exactly 1.0 and every token bitwise equal."""
    bad = []
    for r in run["records"]:
        for k in RATIO_KEYS:
            if k in r and r[k] != 1.0:
                bad.append({"step": r["step"], "metric": k, "value": r[k]})
        if r.get("mismatch/bitwise_equal_fraction") != 1.0:
            bad.append({"step": r["step"], "metric": "mismatch/bitwise_equal_fraction",
                        "value": r.get("mismatch/bitwise_equal_fraction")})
    return {"steps": len(run["records"]), "all_ratios_exactly_one": not bad and bool(run["records"]),
            "violations": bad[:20]}


def wall_seconds(run: dict[str, Any]) -> list[float | None]:
    """Per step, wall seconds from the run's start (``rl_config.json`` is written when it
    starts; each record's ``time`` is when it was logged) to the step's record; a resumed
    run counts from its last start."""
    cfg = Path(run["dir"]) / "rl_config.json"
    if not cfg.exists():
        return [None] * len(run["records"])
    t0 = cfg.stat().st_mtime
    return [round(r["time"] - t0, 1) if isinstance(r.get("time"), (int, float)) else None for r in run["records"]]


def reward_names(runs: list[dict[str, Any]]) -> list[str]:
    names = sorted({k for run in runs for r in run["records"] for k in r if k.startswith("reward/")}
                   - {"reward/std"})
    return ["reward/mean"] + [n for n in names if n != "reward/mean"]


def summary(run: dict[str, Any], names: list[str], window: int) -> dict[str, Any]:
    out = {}
    for n in names:
        vals = [r[n] for r in run["records"] if n in r]
        if not vals:
            continue
        w = max(1, min(window, len(vals) // 2))
        first, last = float(np.mean(vals[:w])), float(np.mean(vals[-w:]))
        out[n] = {"first": first, "last": last, "gain": last - first, "window": w, "curve": vals}
    return out


def _moving(x: list[float], k: int = 3) -> np.ndarray:
    x = np.asarray(x, float)
    return np.array([x[max(0, i - k + 1):i + 1].mean() for i in range(len(x))])


def plot(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = reward_names(runs)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, n in zip(axes[0], names):
        for run in runs:
            steps = [r["step"] for r in run["records"] if n in r]
            vals = [r[n] for r in run["records"] if n in r]
            if not vals:
                continue
            line, = ax.plot(steps, vals, alpha=0.35, marker=".")
            ax.plot(steps, _moving(vals), color=line.get_color(), label=f"{run['name']} ({run['mode']})")
        ax.set_title(n + (" (signed: higher is better)" if n != "reward/mean" else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "rewards.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 4, figsize=(16, 6.4))
    for ax, m in zip(axes.flat, METRICS):
        for run in runs:
            steps = [r["step"] for r in run["records"] if m in r]
            vals = [r[m] for r in run["records"] if m in r]
            ax.plot(steps, vals, marker=".", label=f"{run['name']} ({run['mode']})")
        if m in ("mismatch/logprob_abs_diff_max", "mismatch/logprob_abs_diff_mean", "mismatch/kl_k3"):
            ax.set_yscale("symlog", linthresh=1e-12)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "drift.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def eval_table(before: str, after: str) -> list[dict[str, Any]]:
    """Two ``tml eval`` outputs → rows (task, metric, before, after, change) over the numbers both report."""

    def numbers(d: str) -> dict[tuple[str, str], float]:
        doc = json.loads((Path(d) / "eval.json").read_text())
        out = {}
        for task, metrics in doc.get("tasks", {}).items():   # tml.eval.aggregate's means (no _std / _n)
            for k, v in (metrics or {}).items():
                if k != "n" and not k.endswith(("_std", "_n")) and isinstance(v, (int, float)) \
                        and not isinstance(v, bool):
                    out[(task, k)] = float(v)
        return out

    a, b = numbers(before), numbers(after)
    return [{"task": t, "metric": k, "before": a[(t, k)], "after": b[(t, k)], "change": b[(t, k)] - a[(t, k)]}
            for t, k in sorted(set(a) & set(b))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tml.rl.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="tml rl run directories (rl.run_dir)")
    ap.add_argument("--out", default=None, help="output dir (default: <first run>/report)")
    ap.add_argument("--window", type=int, default=3, help="steps averaged at the start and the end (gain)")
    ap.add_argument("--eval-before", nargs="*", default=[], help="tml eval output dirs before RL (one per run)")
    ap.add_argument("--eval-after", nargs="*", default=[], help="tml eval output dirs after RL (one per run)")
    a = ap.parse_args(argv)
    try:
        runs = [load_run(d) for d in a.runs]
    except FileNotFoundError as e:
        print(f"tml.rl.report: {e}", file=sys.stderr)
        return 2
    if len(a.eval_before) != len(a.eval_after):
        print("tml.rl.report: give as many --eval-before as --eval-after dirs", file=sys.stderr)
        return 2
    out = Path(a.out or Path(a.runs[0]) / "report")
    out.mkdir(parents=True, exist_ok=True)
    names = reward_names(runs)
    doc = {"runs": []}
    ok = True
    for run in runs:
        entry = {"name": run["name"], "dir": run["dir"], "mode": run["mode"], "steps": len(run["records"]),
                 "rewards": summary(run, names, a.window),
                 "drift": {m: [r.get(m) for r in run["records"]] for m in METRICS},
                 "ratios": {k: [r.get(k) for r in run["records"]] for k in RATIO_KEYS},
                 "user": {k: [r.get(k) for r in run["records"]] for k in ("user/stopped", "user/repeated")},
                 "episode_seconds_mean": [r.get("episode/seconds_mean") for r in run["records"]],
                 "step_seconds": [round(sum(v for k, v in r.items() if k.startswith("time/")), 2)
                                  for r in run["records"]],
                 "wall_seconds": wall_seconds(run),
                 "rss_gb": [r.get("mem/rss_gb") for r in run["records"]],
                 "alignment": alignment_check(run)}
        if run["mode"] == "batch_invariant" and not entry["alignment"]["all_ratios_exactly_one"]:
            ok = False
        doc["runs"].append(entry)
    doc["eval"] = [{"before": b, "after": f, "table": eval_table(b, f)} for b, f in zip(a.eval_before, a.eval_after)]
    doc["plots"] = [str(p) for p in plot(runs, out)]
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    for e in doc["runs"]:
        print(f"{e['name']} ({e['mode']}, {e['steps']} steps, {e['wall_seconds'][-1]} s wall): every importance "
              f"ratio exactly 1: {e['alignment']['all_ratios_exactly_one']}")
        for n, s in e["rewards"].items():
            print(f"  {n:28s} first {s['first']:+.3f}  last {s['last']:+.3f}  gain {s['gain']:+.3f} "
                  f"(means of {s['window']} steps)")
    for ev in doc["eval"]:
        print(f"tml eval {ev['before']} -> {ev['after']}")
        for r in ev["table"]:
            print(f"  {r['task']:22s} {r['metric']:14s} {r['before']:8.3f} -> {r['after']:8.3f} ({r['change']:+.3f})")
    print(f"wrote {out / 'report.json'}, " + ", ".join(doc["plots"]))
    if not ok:
        print("tml.rl.report: a batch_invariant run has an importance ratio != 1 (see report.json alignment)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
