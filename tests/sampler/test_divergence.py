"""Drift metrics (tml.sampler.divergence) and ``tml divergence`` (tml.sampler.divergence_run).

The metric tests are pure numpy: aligned input gives exactly 1, 0, 0, 0, 1, 1, 1, 1
(compared with ``==``), and a known perturbation is checked value by value against a
hand computation. The command test runs two short held-out sessions of the tiny test
model (fresh weights) through ``run`` in both kernel modes: divergence.json is written,
``batch_invariant`` is exactly 1.0 bitwise-equal and ``standard`` is not.
"""

import json
import math

import numpy as np
import pytest

from tests.model.tiny_model import CFG
from tml.config import TmlConfig
from tml.sampler.divergence import ALIGNED, METRICS, drift_metrics, equal_bits, first_divergence, session_drift

SAMPLER = np.array([-1.0, -2.0, -0.5, -3.0], np.float32)


def test_aligned_input_gives_exact_values():
    rng = np.random.default_rng(0)
    lp = -rng.exponential(2.0, 1000).astype(np.float32)
    m = drift_metrics(lp, lp.copy())
    assert list(m) == list(METRICS)
    assert [m[k] for k in METRICS] == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert m == ALIGNED
    assert first_divergence(lp, lp.copy()) is None


def test_one_ulp_is_not_equal():
    """Bits, not closeness: one ulp apart counts as diverging."""
    a = SAMPLER.copy()
    b = a.copy()
    b[2] = np.nextafter(b[2], np.float32(0))
    assert equal_bits(a, b).tolist() == [True, True, False, True]
    m = drift_metrics(a, b)
    assert m["mismatch/bitwise_equal_fraction"] == 0.75
    assert 0 < m["mismatch/logprob_abs_diff_max"] < 1e-7


def test_known_perturbation_matches_hand_computation():
    # trainer = sampler + d, d exactly representable: [0, +0.25, 0, -0.5]
    trainer = np.array([-1.0, -1.75, -0.5, -3.5], np.float32)
    d = [0.0, 0.25, 0.0, -0.5]
    r = [math.exp(x) for x in d]                      # importance ratios pi_trainer / pi_sampler
    want = {
        "mismatch/bitwise_equal_fraction": 2 / 4,
        "mismatch/logprob_abs_diff_max": 0.5,
        "mismatch/logprob_abs_diff_mean": (0.25 + 0.5) / 4,
        "mismatch/kl_k3": sum(ri - x - 1 for ri, x in zip(r, d)) / 4,
        "mismatch/is_ratio_min": math.exp(-0.5),
        "mismatch/is_ratio_mean": (2 + math.exp(0.25) + math.exp(-0.5)) / 4,
        "mismatch/is_ratio_max": math.exp(0.25),
        "mismatch/ess": sum(r) ** 2 / (4 * sum(x * x for x in r)),
    }
    got = drift_metrics(SAMPLER, trainer)
    assert list(got) == list(METRICS)
    for k in METRICS:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=0), k
    assert got["mismatch/kl_k3"] > 0 and got["mismatch/ess"] < 1
    s = session_drift(SAMPLER, trainer, positions=[10, 11, 15, 20])
    assert (s.tokens, s.first_diverging_token, s.first_diverging_position) == (4, 1, 11)


def test_k3_is_accurate_for_tiny_differences():
    """expm1(d) - d, not exp(d) - d - 1: a 1-ulp difference gives k3 ~ d^2 / 2, not 0 or noise."""
    a = np.array([-1.0], np.float32)
    b = np.nextafter(a, np.float32(0))
    d = float(b[0]) - float(a[0])
    assert drift_metrics(a, b)["mismatch/kl_k3"] == pytest.approx(d * d / 2, rel=1e-6)


@pytest.mark.parametrize("sampler,trainer,match", [
    (SAMPLER, SAMPLER[:3], "same tokens"),
    (SAMPLER.astype(np.float64), SAMPLER.astype(np.float64), "float32"),
    (SAMPLER, np.array([-1.0, np.nan, -0.5, -3.0], np.float32), "trainer log-prob of token 1"),
    (SAMPLER[:0], SAMPLER[:0], "at least one"),
])
def test_bad_input_is_a_clear_error(sampler, trainer, match):
    with pytest.raises(ValueError, match=match):
        drift_metrics(sampler, trainer)


# ------------------------------------------------------------------------- tml divergence
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``tml divergence`` (run on a composed config): the tiny test model, fresh weights,
    2 held-out sessions of 2 and 4 micro-turns, both modes, 2 per tick."""
    from tml.sampler.divergence_run import run

    cfg = TmlConfig(model=CFG)
    out = tmp_path_factory.mktemp("divergence")
    c = cfg.divergence
    c.checkpoint, c.out, c.sessions, c.batch_size = "none", str(out), 2, 2
    c.min_micro_turns, c.max_micro_turns, c.scenarios = 2, 4, ["rep_count", "turn_taking"]  # video; audio
    doc = run(cfg)
    return out, doc


def test_divergence_json_written(report):
    out, doc = report
    on_disk = json.loads((out / "divergence.json").read_text())
    assert on_disk["modes"].keys() == {"batch_invariant", "standard"}
    assert [s["micro_turns"] for s in on_disk["sessions"]] == [4, 2]  # different lengths
    assert on_disk["sessions"][0]["inputs"]["video"] == 4
    assert on_disk["model"]["checkpoint"] is None and on_disk["model"]["init_seed"] == 0
    for mode in ("batch_invariant", "standard"):
        assert (out / f"divergence_{mode}.png").stat().st_size > 0
        m = on_disk["modes"][mode]
        assert set(m["metrics"]) == set(METRICS)
        assert sum(s["tokens"] for s in m["sessions"]) == sum(len(x["abs_diff"]) for x in m["abs_diff_by_position"])


def test_batch_invariant_exactly_aligned_standard_not(report):
    _, doc = report
    bi, std = doc["modes"]["batch_invariant"], doc["modes"]["standard"]
    assert bi["metrics"]["mismatch/bitwise_equal_fraction"] == 1.0
    assert bi["metrics"] == ALIGNED
    assert all(s["first_diverging_position"] is None for s in bi["sessions"])
    assert std["metrics"]["mismatch/bitwise_equal_fraction"] < 1.0
    assert std["metrics"]["mismatch/logprob_abs_diff_max"] > 0
    assert any(s["first_diverging_position"] is not None for s in std["sessions"])


def test_bad_config_names_what_to_pass(tmp_path):
    from tml.sampler.divergence_run import run

    cfg = TmlConfig(model=CFG)
    cfg.divergence.modes, cfg.divergence.out = ["fast"], str(tmp_path)
    with pytest.raises(SystemExit, match="choose one or more of"):
        run(cfg)
    cfg.divergence.modes, cfg.divergence.checkpoint = ["standard"], str(tmp_path / "missing")
    with pytest.raises(SystemExit, match="does not exist"):
        run(cfg)
