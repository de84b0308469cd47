"""``tml eval``: scenarios -> timelines, policies streamed in ticks, the runner, FD-bench folders.

The oracle (the corpus' own targets) must score near perfect and the always-silent
baseline badly on the same held-out scenarios; an FD-bench folder written from the parity
fixtures must reproduce FD-bench's per-sample numbers; bad samples are skipped with their
reason while the rest are scored.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.eval import fdb_layout
from tml.eval.config import EvalConfig
from tml.eval.policies import AlwaysSilent, ScriptedOracle, stream
from tml.eval.run import prepare, run, run_scenarios
from tml.eval.scenarios import HELD_OUT_INDEX_OFFSET, MicroTurnOutput, text_words

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ text channel -> words
def test_text_words_rule():
    """Words emitted together split their micro-turn; fluent words end where the next starts,
    the last one where the speech run ends; text without speech ends with its micro-turn."""
    texts = [b"", b"hi the", b"re ", b"", b"", b"ok", b""]
    speaking = [False, True, True, False, False, False, False]
    words = text_words(texts, speaking)
    assert [(w.text, w.start, w.end) for w in words] == [
        ("hi", 0.2, 0.3), ("there", 0.3, 0.6), ("ok", 1.0, 1.2)]
    assert [w.text for w in text_words([b"\xc3", b"\xa9t\xc3\xa9 x"], [True, True])] == ["été", "x"]


# ------------------------------------------------------------------ oracle vs silent
@pytest.fixture(scope="module")
def scenario_reports(tmp_path_factory):
    """Oracle and silent on the same held-out scenarios (one of each scenario)."""
    out = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(per_scenario=1, out=str(out / "oracle"), progress=False, batch_size=4)
    oracle = run(cfg, quiet=True)
    silent = run(EvalConfig(per_scenario=1, out=str(out / "silent"), progress=False, policy="silent"), quiet=True)
    return out, oracle, silent


def test_held_out_indices_are_disjoint_from_training():
    from tml.config import DataConfig
    from tml.data_pipelines.build import EVAL_INDEX_OFFSET

    d = DataConfig()
    assert HELD_OUT_INDEX_OFFSET >= EVAL_INDEX_OFFSET + d.eval_conversations
    assert HELD_OUT_INDEX_OFFSET > d.n_conversations
    p = prepare("turn_taking", 0, 0)
    assert p.index == HELD_OUT_INDEX_OFFSET and p.sample_id.endswith(f"{HELD_OUT_INDEX_OFFSET:07d}")


def test_oracle_near_perfect_silent_bad(scenario_reports):
    _, oracle, silent = scenario_reports
    o, s = oracle["tasks"], silent["tasks"]
    assert not oracle["errors"] and not silent["errors"]
    assert len(oracle["samples"]) == 10 == len(silent["samples"])
    # the oracle: every turn taken, answered, on time, counted; no take-over in pauses
    for task, metric in [("smooth_turn_taking", "tor"), ("user_interruption", "tor"), ("overlap_interruption", "success"),
                         ("cue_speak", "accuracy"), ("time_speak", "accuracy"), ("rep_count", "obo")]:
        assert o[task][metric] == 1.0, (task, metric, o[task][metric])
        assert s[task][metric] == 0.0, (task, metric, s[task][metric])
    for task in ("pause_handling", "background_takeover", "backchannel"):
        assert o[task]["tor"] == 0.0
    assert o["backchannel"]["jsd"] < 1e-3 < 0.999 < s["backchannel"]["jsd"]
    assert o["backchannel"]["frequency"] > 0 == s["backchannel"]["frequency"]
    assert o["rep_count"]["normalized_error"] == 0.0 and s["rep_count"]["normalized_error"] == 1.0
    # latencies exist for the oracle only, within the corpus' response gaps
    assert 0.0 <= o["smooth_turn_taking"]["latency"] <= 1.0 and s["smooth_turn_taking"]["latency"] is None
    assert o["cue_speak"]["latency"] <= 1.0 and s["cue_speak"]["latency"] is None


def test_eval_json_and_plots_written(scenario_reports):
    out, oracle, _ = scenario_reports
    saved = json.loads((out / "oracle" / "eval.json").read_text())
    assert saved["policy"] == "oracle" and saved["source"] == "scenarios"
    assert saved["seeds"]["index_offset"] == HELD_OUT_INDEX_OFFSET
    assert saved["config"]["per_scenario"] == 1
    assert {s["scenario"] for s in saved["samples"]} == set(saved["seeds"]["scenarios"])
    assert saved["tasks"]["cue_speak"]["accuracy"] == oracle["tasks"]["cue_speak"]["accuracy"]
    assert {f["task"] for f in saved["published"]["figures"]} >= {"smooth_turn_taking", "pause_handling"}
    for name in ("tasks.png", "latency.png"):
        assert (out / "oracle" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ streaming and bad samples
class FlakyOracle(ScriptedOracle):
    """The oracle, except that one session fails at micro-turn 3 and one answers a wrong type."""

    name = "flaky"

    def step(self, inputs):
        out = dict(super().step(inputs))
        for sid, x in inputs.items():
            if "cue_speak" in sid and x.index == 3:
                out[sid] = RuntimeError("page pool exhausted")
            if "time_speak" in sid and x.index == 2:
                out[sid] = "not an output"
        return out


def test_bad_sessions_are_skipped_with_reason_and_the_rest_scored(tmp_path, capsys):
    cfg = EvalConfig(per_scenario=1, scenarios=["cue_speak", "time_speak", "turn_taking"], out=str(tmp_path),
                     progress=False, plots=False, batch_size=2)
    report = run(cfg, FlakyOracle(), quiet=True)
    errors = {e["sample_id"].split("-")[1]: e["error"] for e in report["errors"]}
    assert set(errors) == {"cue_speak", "time_speak"}
    assert "micro-turn 3: page pool exhausted" in errors["cue_speak"]
    assert "returned str, not a MicroTurnOutput" in errors["time_speak"]
    assert [s["scenario"] for s in report["samples"]] == ["turn_taking"]
    assert report["tasks"]["smooth_turn_taking"]["tor"] == 1.0
    err = capsys.readouterr().err
    assert "skipped synth-cue_speak" in err and "page pool exhausted" in err


def test_stream_batches_sessions_in_ticks():
    """At most batch_size sessions per tick; each gets its micro-turns in order, once."""
    seen: list[dict[str, int]] = []

    class Recorder(AlwaysSilent):
        def step(self, inputs):
            seen.append({sid: x.index for sid, x in inputs.items()})
            return super().step(inputs)

    samples = [prepare(sc, 0, 0).sample for sc in ("turn_taking", "cue_speak", "rep_count")]
    done = list(stream(Recorder(), samples, batch_size=2))
    assert all(d.error is None for d in done)
    assert {d.sample.sample_id: len(d.outputs) for d in done} == {s.sample_id: s.n_micro_turns for s in samples}
    assert max(len(t) for t in seen) == 2
    for s in samples:
        idx = [t[s.sample_id] for t in seen if s.sample_id in t]
        assert idx == list(range(s.n_micro_turns))
    rep = samples[2]  # rep_count: the video arrives as one raw frame pair per micro-turn
    xs = list(rep.inputs())
    assert all(x.video.shape == (2, 80, 80, 3) and x.video.dtype == np.uint8 for x in xs)
    assert all(x.audio.shape == (3200,) and x.dmel.shape == (4, 80) for x in xs)


def test_window_end_rounding_stays_inside_the_window():
    """A word cut at a window end lands exactly on the window's duration (18/5), not on
    42/5 - 24/5 = 3.6000000000000005 (seen on turn_taking held-out conversation 3)."""
    from tml.eval.scenarios import model_parts, window
    from tml.eval.timeline import Annotations

    p = prepare("turn_taking", 0, 0)
    outs = [MicroTurnOutput(b"word ", True)] * p.ref.n_micro_turns
    tl = window(p.ref, model_parts(outs), 24, 42, Annotations(), "w")
    assert tl.model_words[-1].end == tl.duration == 3.6


def test_wrong_output_length_is_a_sample_error():
    from tml.eval.scenarios import SampleError, score

    p = prepare("turn_taking", 0, 1)
    with pytest.raises(SampleError, match=r"returned 3 micro-turns for a scenario of \d+"):
        score(p.ref, [MicroTurnOutput()] * 3)


# ------------------------------------------------------------------ FD-bench folders
@pytest.mark.parametrize("task", fdb_layout.TASKS)
def test_fdb_folder_reproduces_fdb_numbers(tmp_path, task):
    folder = fdb_layout.write_task(tmp_path, task)
    report = run(EvalConfig(source="fdb", fdb_dir=str(folder), out=str(tmp_path / "out"), progress=False), quiet=True)
    assert not report["errors"]
    assert len(report["samples"]) == len(fdb_layout.CASES[task])
    for s in report["samples"]:
        (row,) = s["tasks"]
        ref = fdb_layout.reference(task, s["sample_id"])
        assert row["task"] == task and [row["tor"]] == ref["tor"], s["sample_id"]
        if task != "pause_handling":
            assert ([] if row["latency"] is None else [row["latency"]]) == pytest.approx(ref["latency"], abs=1e-9)
    assert (tmp_path / "out" / "tasks.png").exists()


def test_fdb_bad_samples_skipped(tmp_path):
    folder = fdb_layout.write_task(tmp_path, "smooth_turn_taking")
    (folder / "s_late" / "output.json").unlink()
    bad = folder / "s_short_4_words" / "output.json"
    chunks = json.loads(bad.read_text())
    chunks["chunks"][2]["timestamp"] = [4.3, 4.5]  # overlaps the previous word
    bad.write_text(json.dumps(chunks))
    (folder / "s_no_words" / "turn_taking.json").write_text("[]")
    report = run(EvalConfig(source="fdb", fdb_dir=str(folder), out=str(tmp_path / "out"), progress=False,
                            plots=False), quiet=True)
    errors = {e["sample_id"]: e["error"] for e in report["errors"]}
    assert set(errors) == {"s_late", "s_short_4_words", "s_no_words"}
    assert "output.json is missing" in errors["s_late"]
    assert "before the previous word" in errors["s_short_4_words"]
    assert "turn_taking.json is not in FD-bench's layout" in errors["s_no_words"]
    assert len(report["samples"]) == len(fdb_layout.CASES["smooth_turn_taking"]) - 3


def test_fdb_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="is not a directory"):
        run(EvalConfig(source="fdb", fdb_dir=str(tmp_path / "nope"), out=str(tmp_path)), quiet=True)


# ------------------------------------------------------------------ the command
def test_tml_eval_command_end_to_end(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "tml.cli", "eval", "eval.policy=silent", "eval.per_scenario=1",
           "eval.scenarios=[turn_taking,cue_speak,time_speak]", f"eval.out={out}", "eval.progress=false",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "silent on scenarios: 3 samples scored, 0 skipped" in r.stdout
    assert "THEIR numbers on the real benchmarks" in r.stdout and "TML-Interaction-Small" in r.stdout
    saved = json.loads((out / "eval.json").read_text())
    assert saved["tasks"]["cue_speak"]["accuracy"] == 0.0 and len(saved["samples"]) == 3
    assert (out / "latency.png").exists()
    bad = subprocess.run([sys.executable, "-m", "tml.cli", "eval", "eval.policy=nope", f"eval.out={out}",
                          f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert bad.returncode != 0 and "eval.policy='nope': choose one of" in bad.stderr
    assert not math.isnan(saved["tasks"]["smooth_turn_taking"]["tor"])
