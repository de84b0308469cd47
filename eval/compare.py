"""Several ``tml eval`` runs side by side: one table with a column per policy, ``compare.json``
and a grouped bar plot.

    tml eval eval.policy=oracle;  tml eval eval.policy=silent      # -> runs/eval/<policy>/eval.json
    tml eval eval.policy=model;   tml eval eval.policy=untrained
    python -m tml.eval.compare runs/eval/*/eval.json                # -> runs/eval/compare.json, compare.png

Rows are the headline metrics of :data:`tml.eval.report.HEADLINE` (with their direction,
``·`` for descriptive ones), each a mean over the samples that define it; ``n`` in
brackets when a policy's count differs from the others' (e.g. a latency exists only where
the turn was taken). Columns follow :data:`ORDER` (the oracle first, the always-silent
baseline last), then any other policy by name; two runs of one policy name are told apart
by their directory.

The runs must have scored **the same samples** (the same held-out scenarios, seed and
indices): a comparison of different samples is refused, naming the runs and the samples
that differ (``--allow-different`` compares them anyway, said in the table's header).
A sample one policy skipped (an error) counts as run; the number of skipped samples is a
row of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tml.eval.report import ARROW, HEADLINE

ORDER = ("oracle", "model", "untrained", "silent")
"""Column order of the known policies."""


def load(paths: list[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """Read the eval.json files -> [(column name, report)] in :data:`ORDER`."""
    if not paths:
        raise SystemExit("tml.eval.compare: pass the eval.json files to compare (e.g. runs/eval/*/eval.json)")
    runs = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / "eval.json"
        if not p.is_file():
            raise SystemExit(f"tml.eval.compare: {p} does not exist (run `tml eval eval.policy=... eval.out=...` first)")
        try:
            report = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"tml.eval.compare: {p} is not valid JSON: {e}") from None
        for key in ("policy", "tasks", "samples", "errors"):
            if key not in report:
                raise SystemExit(f"tml.eval.compare: {p} has no {key!r}: not an eval.json written by `tml eval`")
        report["_file"] = str(p)
        runs.append((p, report))
    names = [r["policy"] for _, r in runs]
    cols = [(name if names.count(name) == 1 else f"{name} ({p.parent.name})", r) for (p, r), name in zip(runs, names)]
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(cols, key=lambda c: (rank.get(c[1]["policy"], len(ORDER)), c[0]))


def sample_ids(report: dict[str, Any]) -> set[str]:
    return {s["sample_id"] for s in report["samples"]} | {e["sample_id"] for e in report["errors"]}


def check_same_samples(runs: list[tuple[str, dict[str, Any]]]) -> None:
    """Refuse runs over different samples (module docstring)."""
    (first, ref), *rest = runs
    want = sample_ids(ref)
    for name, r in rest:
        got = sample_ids(r)
        if got != want:
            only_a, only_b = sorted(want - got), sorted(got - want)
            raise SystemExit(
                f"tml.eval.compare: {first!r} and {name!r} scored different samples ({len(want)} vs {len(got)}; "
                f"only in {first!r}: {only_a[:5]}{' ...' if len(only_a) > 5 else ''}; only in {name!r}: "
                f"{only_b[:5]}{' ...' if len(only_b) > 5 else ''}). Run both with the same eval.seed, "
                "eval.per_scenario and eval.scenarios, or pass --allow-different")


def compare(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """-> the compare.json dict: ``policies`` (column names), ``rows`` (task, metric, direction,
    one value and n per policy), ``samples`` / ``skipped`` per policy, ``timing`` per policy."""
    cols = [name for name, _ in runs]
    rows = []
    for task, metrics in HEADLINE.items():
        if not any(task in r["tasks"] for _, r in runs):
            continue
        for metric, way in metrics:
            vals = {name: r["tasks"].get(task, {}).get(metric) for name, r in runs}
            ns = {name: r["tasks"].get(task, {}).get(f"{metric}_n") for name, r in runs}
            if all(v is None for v in vals.values()) and all(n is None for n in ns.values()):
                continue
            rows.append({"task": task, "metric": metric, "direction": way, "values": vals, "n": ns})
    return {
        "policies": cols,
        "files": {name: r.get("_file") for name, r in runs},
        "samples": {name: len(r["samples"]) for name, r in runs},
        "skipped": {name: len(r["errors"]) for name, r in runs},
        "seeds": {name: r.get("seeds") for name, r in runs},
        "model": {name: r["model"] for name, r in runs if "model" in r},
        "timing": {name: r["timing"] for name, r in runs if "timing" in r},
        "rows": rows,
    }


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def table(result: dict[str, Any], note: str = "") -> str:
    """One line per metric, one column per policy."""
    cols = result["policies"]
    w = max(12, *(len(c) + 2 for c in cols))
    lines = [f"{len(cols)} policies on the same {max(result['samples'].values(), default=0)} samples" + note, "",
             f"{'task':<22}{'metric':<22}" + "".join(f"{c:>{w}}" for c in cols)]
    for row in result["rows"]:
        ns = [n for n in row["n"].values() if n is not None]
        common = max(set(ns), key=ns.count) if ns else None
        cells = []
        for c in cols:
            v, n = row["values"][c], row["n"][c]
            cells.append(_fmt(v) + (f" [{n}]" if n is not None and n != common else ""))
        label = f"{row['metric']} {ARROW[row['direction']]}"
        lines.append(f"{row['task']:<22}{label:<22}" + "".join(f"{x:>{w}}" for x in cells))
    lines.append(f"{'':<22}{'skipped samples':<22}" + "".join(f"{result['skipped'][c]:>{w}}" for c in cols))
    if result["timing"]:
        lines.append(f"{'':<22}{'s per sample':<22}" + "".join(
            f"{_fmt(result['timing'][c]['s_per_sample']) if c in result['timing'] else '—':>{w}}" for c in cols))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """One panel per task, grouped bars inside it: a group per metric, a bar per policy
    (panels have their own scale: rates, latencies in s, NLL in nats; × = undefined)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols, rows = result["policies"], result["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    ncols = min(4, max(len(tasks), 1))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    width = 0.8 / max(len(cols), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes.flat, tasks):
        mine = [r for r in rows if r["task"] == task]
        x = np.arange(len(mine))
        for i, c in enumerate(cols):
            vals = [r["values"][c] for r in mine]
            bars = ax.bar(x - 0.4 + width * (i + 0.5), [0.0 if v is None else v for v in vals], width,
                          label=c, color=colors[i % len(colors)])
            for b, v in zip(bars, vals):
                if v is None:
                    ax.text(b.get_x() + b.get_width() / 2, 0, "×", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, [f"{r['metric']} {ARROW[r['direction']]}" for r in mine], fontsize=7, rotation=20)
        ax.set_title(task, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(cols), fontsize=8)
    fig.suptitle(f"tml eval: {len(cols)} policies on the same held-out samples (× = undefined)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m tml.eval.compare", description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="eval.json files (or their directories)")
    ap.add_argument("--out", help="where compare.json and compare.png go (default: the reports' common parent)")
    ap.add_argument("--allow-different", action="store_true", help="compare runs over different samples")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    runs = load(args.reports)
    note = ""
    if args.allow_different:
        note = " (--allow-different: the runs' samples may differ)"
    else:
        check_same_samples(runs)
    result = compare(runs)
    if args.out:
        out = Path(args.out)
    else:
        parents = [Path(p).resolve().parent if Path(p).is_file() else Path(p).resolve() for p in args.reports]
        common = parents[0]
        while not all(common == q or common in q.parents for q in parents):
            common = common.parent
        out = common
    from tml.files import atomic_write_json

    atomic_write_json(out / "compare.json", result)
    written = [out / "compare.json"]
    if not args.no_plot:
        written.append(plot(result, out / "compare.png"))
    print(table(result, note))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
