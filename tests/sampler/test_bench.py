"""``python -m tml.sampler.bench --quick`` runs end to end (both modes, every section) and
writes its JSON; the table marks a missed target."""

import json
import subprocess
import sys

import pytest

from tml.sampler.bench import TARGETS, format_table


@pytest.mark.slow  # ~45 s of CPU: a subprocess compiling 6 programs (3 shapes x 2 modes) of the tiny recipe
def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "sampler.json"
    r = subprocess.run([sys.executable, "-m", "tml.sampler.bench", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["quick"] and rep["targets"] == TARGETS
    for t in rep["ticks"]:
        for mode in ("batch_invariant", "standard"):
            m = t["modes"][mode]
            assert 0 < m["p50_ms"] <= m["p99_ms"] and m["n"] == 2 and m["decode_steps"] >= 2
        assert t["ratio_p50"] == t["modes"]["batch_invariant"]["p50_ms"] / t["modes"]["standard"]["p50_ms"]
    pool = rep["pool_size"]
    assert pool["pool_pages"] == [17, 161] and set(pool["ratio_p50"]) == {"batch_invariant", "standard"}
    assert pool["modes"]["standard"]["161"]["pool_bytes"] > pool["modes"]["standard"]["17"]["pool_bytes"]
    row = rep["append_vs_reprefill"][0]
    assert row["history_tokens"] > 100 and row["modes"]["batch_invariant"]["reprefill_ms"] > 0
    assert 0 < row["modes"]["standard"]["append_prefill_ms"] < row["modes"]["standard"]["append_tick_ms"]
    mins = rep["minutes"]
    assert mins["history_tokens"][1] > mins["history_tokens"][0] > 0
    assert rep["memory"]["kv_bytes_per_minute"] > 0
    assert "tick latency" in r.stdout and "memory per session-minute" in r.stdout
    assert "tick vs pool size" in r.stdout


def test_table_marks_missed_targets():
    def mode(p50, p99):
        return {"p50_ms": p50, "p99_ms": p99, "mean_ms": p50, "n": 3, "decode_steps": 16}

    rep = {"ticks": [{"model": "tiny", "sessions": 16, "modes": {"batch_invariant": mode(40, 80),
                                                                 "standard": mode(20, 30)},
                      "ratio_p50": 2.0, "ratio_p99": 80 / 30}],
           "vocoder_ms_per_speaking_micro_turn": 5.0,
           "append_vs_reprefill": [{"seconds": 60, "history_tokens": 3000,
                                    "modes": {m: {"reprefill_ms": 100, "append_tick_ms": 10, "speedup": 11,
                                                  "append_prefill_ms": 9, "speedup_whole_micro_turn": 11}
                                              for m in ("batch_invariant", "standard")}}],
           "minutes": {"minute_1": {"batch_invariant": mode(10, 11), "standard": mode(10, 11)},
                       "minute_10": {"batch_invariant": mode(10.2, 11), "standard": mode(20, 21)},
                       "ratio_p50": {"batch_invariant": 1.02, "standard": 2.0}, "history_tokens": [1, 10]},
           "memory": {"model": "tiny", "kv_bytes_per_minute": 2 ** 20, "tokens_per_minute": 3000,
                      "rss_growth_bytes_per_session_minute": 0}}
    table = format_table(rep)
    lines = table.splitlines()
    assert "MISSED" in next(line for line in lines if line.startswith("tiny x16"))     # p99 80 > 50
    assert "MISSED" in next(line for line in lines if "worst batch_invariant" in line)  # 2.0 > 1.25
    assert "MISSED" in next(line for line in lines if line.startswith("60 s"))          # 11x < 20x
    assert "ok" in next(line for line in lines if line.startswith("ratio (p50)"))       # 1.02 <= 1.05
