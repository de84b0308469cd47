"""The training-throughput benchmark runs end to end and writes its JSON (a smoke run on
tiny shapes: no speed is asserted), and its peak-RSS probe reads a child's memory."""

import json
import math
import sys

from tml.train import bench


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    result = bench.main(["--quick", "--no-memory", "--models", "tiny", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(result["results"]))
    assert positive(data["peak_flops"]) and data["memory"] is None
    (r,) = data["results"]
    assert r["model"] == "tiny"
    rows, length, patches = bench.QUICK_SHAPE
    assert r["shape"] | {"rows": rows, "row_length": length, "patches_per_row": patches} == r["shape"]
    assert r["tokens_per_step"] == rows * length
    assert positive(r["model_flops_per_step"]) and r["model_flops_per_step"] < r["six_n_active_flops_per_step"]
    assert positive(r["ratio_batch_invariant_over_standard"])
    for mode in bench.MODES:
        m = r["modes"][mode]
        for key in ("step_s_median", "step_s_best", "tokens_per_s", "mfu", "compile_s", "first_step_s"):
            assert positive(m[key]), (mode, key, m[key])
        assert math.isfinite(m["last_loss"])
    assert "ratio" in capsys.readouterr().out


def test_peak_rss_is_the_childs_own(tmp_path):
    """300 MiB in the child, while this process holds 512 MiB more: the child's own peak
    (``ru_maxrss`` would include the parent's pages copied before ``exec``). The peak is
    polled, so the child lingers a moment as a training run does."""
    import numpy as np

    held = np.ones(2**26)                                           # 512 MiB, touched
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    res = bench.run_and_measure_rss([sys.executable, "-c", code], log_path=tmp_path / "log")
    assert res["returncode"] == 0 and held[-1] == 1
    assert 0.29 < res["peak_rss_gib"] < 0.6, res
