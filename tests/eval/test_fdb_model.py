"""``tml eval`` with ``eval.source=fdb`` and a policy: the policy runs on each sample's input.wav.

A tiny Full-Duplex-Bench folder (a smooth turn-taking and a pause-handling sample, speech
from ``tests/audio/fixtures``, one written at 22,050 Hz stereo so the reader resamples and
downmixes it; no output.json: nothing but input.wav and the task json) is streamed through
the tiny test model (fresh weights) and scored per sample; a sample with a corrupt
input.wav is skipped with its reason while the others are scored; ``eval.policy=outputs``
still scores the folder's own outputs (and reports the samples that have none).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.model.tiny_model import tiny_model
from tml.eval.config import EvalConfig
from tml.eval.policies import ModelPolicy, ModelSampling
from tml.eval.run import run

AUDIO = Path(__file__).resolve().parents[1] / "audio" / "fixtures"
SAMPLING = ModelSampling(max_output_tokens=6, max_context=1024)
ENGINE = dict(chunk_buckets=(32,), patch_buckets=(4,))  # one prefill program


def write_folder(root: Path, corrupt: bool = False) -> Path:
    folder = root / "fdb"
    fox, sr = soundfile.read(AUDIO / "speech_fox_16k.flac", dtype="float32")
    d = folder / "1"
    d.mkdir(parents=True)
    soundfile.write(d / "input.wav", np.concatenate([fox, np.zeros(sr, np.float32)]), sr)  # 4.205 s
    (d / "turn_taking.json").write_text(json.dumps([{"timestamp": [3.2, 4.2]}]))
    hello, sr = soundfile.read(AUDIO / "speech_hello_22050.flac", dtype="float32")
    d = folder / "2"
    d.mkdir()
    stereo = np.stack([hello, 0.5 * hello], axis=1)
    soundfile.write(d / "input.wav", np.concatenate([stereo, stereo]), sr)  # 4.172 s, 22,050 Hz stereo
    (d / "pause.json").write_text(json.dumps([{"timestamp": [1.0, 2.1]}]))
    if corrupt:
        d = folder / "3"
        d.mkdir()
        (d / "input.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
        (d / "turn_taking.json").write_text(json.dumps([{"timestamp": [1.0, 2.0]}]))
    return folder


@pytest.fixture(scope="module")
def policy():
    return ModelPolicy(tiny_model(), name="untrained", max_sessions=2, sampling=SAMPLING, **ENGINE)


def test_model_runs_on_each_input_wav_and_skips_a_corrupt_one(tmp_path, policy):
    folder = write_folder(tmp_path, corrupt=True)
    cfg = EvalConfig(source="fdb", policy="untrained", fdb_dir=str(folder), out=str(tmp_path / "out" / "{policy}"),
                     batch_size=2, progress=False, plots=False)
    result = run(cfg, policy, quiet=True)
    saved = json.loads((tmp_path / "out" / "untrained" / "eval.json").read_text())
    assert saved["policy"] == "untrained" and saved["source"] == "fdb"
    assert [(s["sample_id"], s["scenario"], s["micro_turns"]) for s in saved["samples"]] == [
        ("1", "smooth_turn_taking", 22), ("2", "pause_handling", 21)]  # ceil(4.205 s / 0.2 s), ceil(4.172 s / 0.2 s)
    for s in saved["samples"]:
        (row,) = s["tasks"]
        assert row["task"] == s["scenario"] and row["tor"] in (0, 1)
    assert set(saved["tasks"]) == {"smooth_turn_taking", "pause_handling"}
    ((err),) = saved["errors"]
    assert err["sample_id"] == "3" and "input.wav cannot be read" in err["error"], err
    assert saved["timing"]["samples"] == 2 and saved["timing"]["micro_turns"] == 43
    assert result["samples"] == saved["samples"]


def test_silent_policy_and_outputs_policy_on_the_same_folder(tmp_path):
    folder = write_folder(tmp_path)
    silent = run(EvalConfig(source="fdb", policy="silent", fdb_dir=str(folder), out=str(tmp_path / "s"),
                            progress=False, plots=False), quiet=True)
    assert not silent["errors"] and [s["tasks"][0]["tor"] for s in silent["samples"]] == [0, 0]
    assert silent["tasks"]["smooth_turn_taking"]["latency"] is None
    # outputs: the folder's own output.json is scored; these samples have none -> reported, skipped
    outputs = run(EvalConfig(source="fdb", policy="outputs", fdb_dir=str(folder), out=str(tmp_path / "o"),
                             progress=False, plots=False), quiet=True)
    assert outputs["policy"] == "fdb outputs" and not outputs["samples"]
    assert all("output.wav is missing" in e["error"] for e in outputs["errors"]) and len(outputs["errors"]) == 2


def test_fdb_recipe_defaults_to_the_model_policy():
    from omegaconf import OmegaConf

    recipe = OmegaConf.load(Path(__file__).resolve().parents[2] / "recipes" / "eval" / "fdb.yaml")
    assert recipe.source == "fdb" and recipe.policy == "model"
