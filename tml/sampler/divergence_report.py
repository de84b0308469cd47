"""What ``tml divergence`` prints and plots from the :class:`~tml.sampler.divergence_run.ModeResult` s.

* :func:`table` — the eight ``mismatch/*`` metrics, one column per kernel mode, then the
  sessions that diverged and where the first one did;
* :func:`plot` — per mode, ``<out>/divergence_<mode>.png``: |Δ log-prob| over row position
  (every sampled token; exact zeros drawn on the floor line), the first diverging position
  of each session beside its row length, and the metrics.

matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tml.sampler.divergence import METRICS

FLOOR = 1e-12  # where a zero |Δ| is drawn on the log axis


def _fmt(v: float) -> str:
    """Exact 0 and 1 print as such; a value merely close to 1 prints its offset (1-1.5e-05),
    so an aligned column can never be mistaken for a rounded one."""
    if v == 0 or v == 1:
        return str(int(v))
    if abs(v - 1) < 1e-3:
        return f"1{v - 1:+.2e}"
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.3e}"


def table(results: dict) -> str:
    """The summary table (one column per mode)."""
    modes = list(results)
    w = max(14, *(len(m) + 2 for m in modes))
    lines = [f"{'metric':<34}" + "".join(f"{m:>{w}}" for m in modes)]
    for k in METRICS:
        lines.append(f"{k:<34}" + "".join(f"{_fmt(results[m].metrics[k]):>{w}}" for m in modes))
    tokens = [sum(s["tokens"] for s in results[m].sessions) for m in modes]
    lines.append(f"{'tokens compared':<34}" + "".join(f"{t:>{w}}" for t in tokens))
    div = []
    for m in modes:
        firsts = [s["first_diverging_position"] for s in results[m].sessions]
        hit = [p for p in firsts if p is not None]
        div.append(f"{len(hit)}/{len(firsts)}" + (f" @{min(hit)}" if hit else ""))
    lines.append(f"{'sessions diverging (first slot)':<34}" + "".join(f"{d:>{w}}" for d in div))
    return "\n".join(lines)


def plot(results: dict, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``divergence_<mode>.png`` for each mode into ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for mode, r in results.items():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [2.2, 1.6, 1.3]})
        ax = axes[0]
        for i, (p, d) in enumerate(zip(r.positions, r.abs_diff)):
            ax.scatter(p, np.maximum(d, FLOOR), s=5, alpha=0.6, label=r.sessions[i]["name"] if i < 8 else None)
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 3, max(1.0, max((d.max() for d in r.abs_diff if d.size), default=1.0)) * 3)
        ax.axhline(FLOOR, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("position in the session row (slot)")
        ax.set_ylabel(f"|Δ log-prob| (bitwise equal drawn at {FLOOR:g})")
        ax.set_title("|trainer − sampler| per sampled token", fontsize=9)
        ax.legend(fontsize=6, markerscale=2, loc="upper right")

        ax = axes[1]
        n = len(r.sessions)
        lengths = [s["row_length"] for s in r.sessions]
        firsts = [s["first_diverging_position"] for s in r.sessions]
        ax.barh(range(n), lengths, color="#d9d9d9", label="row length")
        ax.barh(range(n), [f if f is not None else 0 for f in firsts], color="tab:red", label="first diverging slot")
        for i, f in enumerate(firsts):
            ax.text(lengths[i], i, " aligned" if f is None else f" first @{f}", va="center", fontsize=7)
        ax.set_yticks(range(n), [s["name"] for s in r.sessions], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("slot")
        ax.set_title("first diverging position per session", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")

        ax = axes[2]
        ax.set_axis_off()
        rows = [[k.removeprefix("mismatch/"), _fmt(r.metrics[k])] for k in METRICS]
        tab = ax.table(cellText=rows, colLabels=["mismatch/", mode], loc="center", cellLoc="left",
                       colWidths=[0.78, 0.42])
        tab.auto_set_font_size(False)
        tab.set_fontsize(8)
        tab.scale(1, 1.3)
        fig.suptitle(f"tml divergence — {mode}" + (f" — {title}" if title else ""), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"divergence_{mode}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["plot", "table"]
