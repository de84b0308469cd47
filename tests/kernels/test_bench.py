"""The benchmark entry point runs and writes its JSON (a smoke run on tiny shapes)."""

import json

from tml.kernels import bench


def test_bench_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    result = bench.main(["--quick", "--configs", "tiny", "--ops", "linear_up,rms_norm", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["results"] and data["results"] == json.loads(json.dumps(result["results"]))
    regimes = {r["regime"] for r in data["results"]}
    assert {"train", "prefill", "decode"} <= regimes
    for r in data["results"]:
        assert r["standard_us"] > 0 and r["batch_invariant_us"] > 0
        assert abs(r["ratio"] - r["batch_invariant_us"] / r["standard_us"]) < 1e-9
    printed = capsys.readouterr().out
    assert "ratio" in printed and "rms_norm" in printed
