"""tml's FD-bench v1 scorers give FD-bench's own numbers on every recorded fixture.

Fixtures: ``fixtures/fdb_v1/cases.json`` (tml timelines and the FD-bench files written
from them) and ``reference_outputs.json`` (what FD-bench's scoring functions computed
on those files; see ``fixtures/fdb_v1/README.md``). Counts and TOR must be equal,
floats within 1e-9. No network and no FD-bench checkout are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tml.eval import aggregate, backchannel, interruption_end, pause_handling, smooth_turn_taking, user_interruption
from tml.eval.timeline import Timeline

FIXTURES = Path(__file__).parent / "fixtures" / "fdb_v1"
CASES = json.loads((FIXTURES / "cases.json").read_text())
REFERENCE = json.loads((FIXTURES / "reference_outputs.json").read_text())
SCORERS = {
    "pause_handling": pause_handling,
    "smooth_turn_taking": smooth_turn_taking,
    "user_interruption": user_interruption,
    "backchannel": backchannel,
}
TOL = 1e-9

PARAMS = [(task, c) for task, cs in CASES.items() for c in cs]
IDS = [f"{task}-{c['timeline']['sample_id']}" for task, c in PARAMS]


def test_fixture_covers_every_task_with_enough_samples():
    assert set(CASES) == set(SCORERS)
    assert len(PARAMS) >= 20
    assert REFERENCE["source"]["commit"] == "d7336bda1385872b83b48a8d45d9c0003836a60d"


@pytest.mark.parametrize("task,case", PARAMS, ids=IDS)
def test_fdb_files_were_written_from_the_timeline(task, case):
    """The FD-bench inputs hold the timeline's words (cropped at the interruption end
    for user interruption), annotation times and speech segments."""
    tl = Timeline.from_dict(case["timeline"])
    files = case["fdb_inputs"]
    words = tl.model_words
    if task == "user_interruption":
        t_end = interruption_end(tl)
        words = [w for w in words if w.start >= t_end]
        assert files["interrupt.json"][0]["timestamp"][1] == t_end
    if task == "smooth_turn_taking":
        assert files["turn_taking.json"][0]["timestamp"][0] == tl.annotations.turn_ends[0]
    if task == "backchannel":
        assert [[s["start"], s["end"]] for s in files["vad_segments.json"]] == [
            list(s) for s in tl.model_speech_segments()
        ]
        assert files["output.wav"]["n_samples"] / files["output.wav"]["sample_rate"] == tl.duration
    chunks = files["output.json"]["chunks"]
    assert [(c["text"], *c["timestamp"]) for c in chunks] == [(w.text, w.start, w.end) for w in words]


@pytest.mark.parametrize("task,case", PARAMS, ids=IDS)
def test_per_sample_scores_match_fdb(task, case):
    tl = Timeline.from_dict(case["timeline"])
    ref = REFERENCE["tasks"][task]["per_sample"][tl.sample_id]
    got = SCORERS[task](tl)
    assert got["tor"] == ref["tor"][0]
    if task in ("smooth_turn_taking", "user_interruption"):
        if ref["latency"]:
            assert got["latency"] == pytest.approx(ref["latency"][0], abs=TOL, rel=0)
        else:
            assert got["latency"] is None
    if task == "backchannel":
        assert got["jsd"] == pytest.approx(ref["jsd"][0], abs=TOL, rel=0)
        assert got["frequency"] == pytest.approx(ref["frequency"][0], abs=TOL, rel=0)


@pytest.mark.parametrize("task", sorted(SCORERS))
def test_task_averages_match_fdb(task):
    """Several samples averaged: the aggregate skips exactly what FD-bench skips."""
    results = [SCORERS[task](Timeline.from_dict(c["timeline"])) for c in CASES[task]]
    summary = aggregate({task: results})[task]
    ref = REFERENCE["tasks"][task]["all_samples"]
    assert summary["n"] == len(ref["tor"])
    if task == "backchannel":
        for ours, theirs in (("tor", "tor"), ("jsd", "jsd"), ("frequency", "freq")):
            assert summary[ours] == pytest.approx(ref[f"{theirs}_mean"], abs=TOL, rel=0)
            assert summary[f"{ours}_std"] == pytest.approx(ref[f"{theirs}_std"], abs=TOL, rel=0)
        return
    assert summary["tor"] == pytest.approx(ref["average_take_turn"], abs=TOL, rel=0)
    assert sorted(r["tor"] for r in results) == sorted(ref["tor"])
    if task != "pause_handling":
        assert summary["latency_n"] == len(ref["latency"])
        assert summary["latency"] == pytest.approx(ref["average_latency"], abs=TOL, rel=0)


def test_fixtures_exercise_the_edge_cases():
    """The recorded references include both TOR outcomes per task, a clipped latency
    and a sample whose latency is skipped, so the parity above is not vacuous."""
    for task in SCORERS:
        tors = {REFERENCE["tasks"][task]["per_sample"][c["timeline"]["sample_id"]]["tor"][0] for c in CASES[task]}
        assert tors == {0, 1}, task
    stt = REFERENCE["tasks"]["smooth_turn_taking"]["per_sample"]
    assert stt["s_one_micro_turn_early"]["latency"] == [0]  # 3.8 - 4.0 clipped
    assert stt["s_no_words"]["latency"] == []
    assert REFERENCE["tasks"]["pause_handling"]["per_sample"]["p_exactly_1s_3_words"]["tor"] == [1]
    assert REFERENCE["tasks"]["pause_handling"]["per_sample"]["p_nominal_1s_float_below_3_words"]["tor"] == [0]
