"""``python -m tml.eval.compare``: one column per policy, runs over different samples refused."""

from __future__ import annotations

import json

import pytest

from tml.eval.compare import main


def _report(policy: str, ids: list[str], tor: float, latency: float | None) -> dict:
    row = {"n": len(ids), "tor": tor, "tor_n": len(ids), "latency": latency, "latency_n": 0 if latency is None else 1}
    return {"policy": policy, "source": "scenarios", "samples": [{"sample_id": i, "tasks": []} for i in ids],
            "errors": [], "tasks": {"smooth_turn_taking": row}}


def _write(tmp_path, name: str, report: dict):
    d = tmp_path / name
    d.mkdir()
    (d / "eval.json").write_text(json.dumps(report))
    return str(d / "eval.json")


def test_table_has_a_column_per_policy_in_order(tmp_path, capsys):
    ids = ["a", "b"]
    files = [_write(tmp_path, "silent", _report("silent", ids, 0.0, None)),
             _write(tmp_path, "oracle", _report("oracle", ids, 1.0, 0.4)),
             _write(tmp_path, "model", _report("model", ids, 0.5, 0.9))]
    result = main(files)
    assert result["policies"] == ["oracle", "model", "silent"]
    row = next(r for r in result["rows"] if r["metric"] == "tor")
    assert row["values"] == {"oracle": 1.0, "model": 0.5, "silent": 0.0}
    lat = next(r for r in result["rows"] if r["metric"] == "latency")
    assert lat["values"]["silent"] is None
    assert json.loads((tmp_path / "compare.json").read_text())["policies"] == result["policies"]
    assert (tmp_path / "compare.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "oracle" in out and "1.000" in out and "0.500" in out


def test_runs_over_different_samples_are_refused(tmp_path):
    a = _write(tmp_path, "oracle", _report("oracle", ["a", "b"], 1.0, 0.4))
    b = _write(tmp_path, "silent", _report("silent", ["a", "c"], 0.0, None))
    with pytest.raises(SystemExit, match=r"scored different samples.*only in 'oracle': \['b'\]"):
        main([a, b, "--no-plot"])
    assert main([a, b, "--no-plot", "--allow-different"])["policies"] == ["oracle", "silent"]
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "nope" / "eval.json")])
