"""python -m tml.rl.report: curves and gains from metrics.jsonl, plots written, and the
alignment check fails a batch_invariant run with one importance ratio != 1."""

import json
import time

from tml.rl.report import main
from tml.sampler.divergence import ALIGNED


def fake_run(d, mode, rewards, ratio=1.0):
    d.mkdir()
    (d / "rl_config.json").write_text(json.dumps({"kernel_mode": mode}))
    lines = []
    for s, r in enumerate(rewards, 1):
        rec = {"step": s, **ALIGNED, "reward/mean": r, "reward/pause_tor": -r, "rl/ratio_min": 1.0,
               "rl/ratio_max": ratio if s == 2 else 1.0, "time/rollout_s": 1.0,
               "time": time.time() + 10.0 * s, "mem/rss_gb": 2.0}
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_report_gains_plots_and_alignment(tmp_path, capsys):
    a = fake_run(tmp_path / "bi", "batch_invariant", [0.0, 0.1, 0.5, 0.9])
    b = fake_run(tmp_path / "std", "standard", [0.0, 0.2, 0.4, 0.6], ratio=1.0000001)
    assert main([str(a), str(b), "--out", str(tmp_path / "rep"), "--window", "2"]) == 0
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    bi, std = doc["runs"]
    assert bi["rewards"]["reward/mean"]["gain"] == (0.5 + 0.9) / 2 - (0.0 + 0.1) / 2
    assert bi["alignment"]["all_ratios_exactly_one"] and not std["alignment"]["all_ratios_exactly_one"]
    assert [round(w / 10) for w in bi["wall_seconds"]] == [1, 2, 3, 4] and bi["rss_gb"] == [2.0] * 4
    assert (tmp_path / "rep" / "rewards.png").stat().st_size > 0 and (tmp_path / "rep" / "drift.png").exists()
    assert "every importance ratio exactly 1: True" in capsys.readouterr().out
    c = fake_run(tmp_path / "bad", "batch_invariant", [0.0, 1.0], ratio=0.9999999)
    assert main([str(c), "--out", str(tmp_path / "rep2")]) == 1
    assert main([str(tmp_path / "nowhere")]) == 2
