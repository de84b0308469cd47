"""``tml eval`` output: the per-task table, the comparison with published figures, the plots.

Every function reads the ``eval.json`` dict :func:`tml.eval.run.run` builds, so a saved
report can be re-printed or re-plotted later (``json.load`` it and call these).

Plots (matplotlib, Agg backend, PNG in ``<out>/``):

* ``tasks.png`` -- one bar per headline metric of each task (:data:`HEADLINE`), with its
  direction (higher / lower is better) in the label;
* ``latency.png`` -- histograms of every latency the samples produced (turn-taking,
  interruption, overlap stop/response, CueSpeak, TimeSpeak timing error), seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tml.eval.published import MODELS, PUBLISHED, SOURCES

HEADLINE: dict[str, tuple[tuple[str, str], ...]] = {
    "smooth_turn_taking": (("tor", "up"), ("latency", "down")),
    "pause_handling": (("tor", "down"),),
    "backchannel": (("tor", "down"), ("frequency", "up"), ("jsd", "down")),
    "user_interruption": (("tor", "up"), ("latency", "down")),
    "overlap_interruption": (("success", "up"), ("stop_latency", "down"), ("response_latency", "down")),
    "background_takeover": (("tor", "down"),),
    "cue_speak": (("accuracy", "up"), ("latency", "down")),
    "time_speak": (("accuracy", "up"), ("timing_error", "down")),
    "rep_count": (("normalized_error", "down"), ("obo", "up")),
    # descriptive rows (tml.eval.activity, tml.eval.target_loss): how the policy failed or learned
    "activity": (("speaking_agreement", "up"), ("speaking_f1", "up"), ("text_f1", "up"),
                 ("speaking_rate", "info"), ("text_rate", "info"), ("text_bytes", "info")),
    "target_nll": (("text", "down"), ("speech", "down"), ("control", "down")),
    "user_reactions": (("stopped_per_min", "down"), ("repeated_per_min", "down")),  # long episodes
}
"""Per task, the metrics the table and plots show and which way is better (``info``:
descriptive, no better direction)."""

LATENCIES = (("smooth_turn_taking", "latency"), ("user_interruption", "latency"),
             ("overlap_interruption", "stop_latency"), ("overlap_interruption", "response_latency"),
             ("cue_speak", "latency"), ("time_speak", "timing_error"))
ARROW = {"up": "↑", "down": "↓", "info": "·"}


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table(report: dict[str, Any]) -> str:
    """The per-task summary: task, metric (direction), mean, n samples that define it."""
    tasks = report["tasks"]
    lines = [f"{report['policy']} on {report['source']}: {len(report['samples'])} samples scored, "
             f"{len(report['errors'])} skipped", "",
             f"{'task':<22}{'metric':<22}{'mean':>9}{'n':>6}"]
    for task in sorted(tasks, key=lambda t: list(HEADLINE).index(t) if t in HEADLINE else 99):
        s = tasks[task]
        for metric, way in HEADLINE.get(task, ()):
            if metric in s:
                lines.append(f"{task:<22}{metric + ' ' + ARROW[way]:<22}{_fmt(s[metric]):>9}{s.get(metric + '_n', ''):>6}")
    return "\n".join(lines)


def comparison(report: dict[str, Any]) -> str:
    """tml's numbers beside the published ones (theirs: real benchmarks; see tml.eval.published)."""
    tasks = report["tasks"]
    head = f"{'task / metric':<32}{'tml (' + report['source'] + ')':>18}" + "".join(f"{m:>23}" for m in MODELS)
    lines = ["Published figures are THEIR numbers on the real benchmarks, not on these samples:", head]
    for (task, metric), theirs in PUBLISHED.items():
        ours = tasks.get(task, {}).get(metric)
        if ours is not None and metric == "accuracy":
            ours = 100.0 * ours
        lines.append(f"{task + ' ' + metric:<32}{_fmt(ours):>18}" + "".join(f"{_fmt(theirs.get(m)):>23}" for m in MODELS))
    lines.append("sources: " + "; ".join(sorted({f"{v}" for v in SOURCES.values()})))
    return "\n".join(lines)


def latencies(report: dict[str, Any]) -> dict[str, list[float]]:
    """Every per-sample latency in the report, keyed ``task.metric``."""
    out: dict[str, list[float]] = {}
    for sample in report["samples"]:
        for row in sample["tasks"]:
            for task, metric in LATENCIES:
                if row["task"] == task and row.get(metric) is not None:
                    out.setdefault(f"{task}.{metric}", []).append(float(row[metric]))
    return out


def plot(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``tasks.png`` and ``latency.png`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bars = [(f"{task}\n{metric} {ARROW[way]}", report["tasks"][task][metric])
            for task, metrics in HEADLINE.items() if task in report["tasks"]
            for metric, way in metrics if report["tasks"][task].get(metric) is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(bars)), 4.5))
    heights = [v for _, v in bars]
    ax.bar(range(len(bars)), heights, color="tab:blue")
    for i, v in enumerate(heights):  # a zero bar is invisible: print every value
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(bars)), [k for k, _ in bars], rotation=60, ha="right", fontsize=7)
    ax.set_title(f"tml eval: {report['policy']} on {report['source']} ({len(report['samples'])} samples)")
    ax.set_ylabel("mean over samples (latencies in s)")
    fig.tight_layout()
    paths = [out_dir / "tasks.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    lat = latencies(report)
    fig, axes = plt.subplots(1, max(1, len(lat)), figsize=(3.2 * max(1, len(lat)), 3.0), squeeze=False)
    for ax, (key, values) in zip(axes[0], sorted(lat.items())):
        ax.hist(values, bins=20, range=(0.0, max(1.0, max(values))), color="tab:orange")
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("seconds")
    if not lat:
        axes[0][0].text(0.5, 0.5, "no latencies (no responses)", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    paths.append(out_dir / "latency.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
