"""``tml sample`` end to end in a subprocess on a fixture (22,050 Hz FLAC: read and
resampled), fresh weights: the stereo wav (model left, user right, silence where the
model did not speak), the timestamped transcript, the timeline plot; bad input errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tml.audio import load_audio, read_audio
from tml.config import TmlConfig
from tml.sampler.sample_cli import run, words

FIXTURE = Path(__file__).parents[1] / "audio" / "fixtures" / "speech_hello_22050.flac"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    r = subprocess.run([sys.executable, "-m", "tml.cli", "sample", f"sample.audio={FIXTURE}", "sample.checkpoint=none",
                        f"sample.out={out}", "sample.tail_seconds=0.4", "sample.max_output_tokens=8",
                        "sample.temperature=1.0", "sample.top_p=1.0", "sample.progress=false"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_stereo_wav_model_left_user_right(sampled):
    out, _ = sampled
    x, sr = read_audio(out / "conversation.wav")
    user = load_audio(FIXTURE, 16000)
    n_turns = -(-len(user) // 3200) + 2
    assert sr == 16000 and x.shape == (n_turns * 3200, 2)
    assert np.abs(x[:len(user), 1] - user).max() < 2 / 32768   # the user, as heard (16-bit PCM)
    summary = json.loads((out / "sample.json").read_text())
    tr = json.loads((out / "transcript.json").read_text())
    speaking = np.array([t["speaking"] for t in tr["micro_turns"]])
    assert len(speaking) == n_turns == summary["micro_turns"]
    model = x[:, 0].reshape(n_turns, 3200)
    assert not np.any(model[~speaking])                       # silence where it did not speak
    if speaking.any():
        assert np.abs(model[speaking]).max() > 0


def test_transcript_and_timeline(sampled):
    out, r = sampled
    tr = json.loads((out / "transcript.json").read_text())
    starts = [t["start"] for t in tr["micro_turns"]]
    assert starts == [round(0.2 * i, 3) for i in range(len(starts))]
    assert tr["text"] == "".join(t["text"] for t in tr["micro_turns"])
    assert all(w[2] == "SPEAKER_MAIN" and w[1][0] < w[1][1] for w in tr["alignments"])
    txt = (out / "transcript.txt").read_text()
    assert len(txt.splitlines()) == sum(1 for t in tr["micro_turns"] if t["text"] or t["control"])
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "real_time_factor" in r.stdout


def test_words_span_their_micro_turns():
    class O:
        def __init__(self, t, b):
            self.micro_turn, self.text_bytes = t, b

    assert words([O(0, b"he"), O(1, b"llo w"), O(2, b""), O(3, b"orld ")]) == [
        ["hello", [0.0, 0.4], "SPEAKER_MAIN"], ["world", [0.2, 0.8], "SPEAKER_MAIN"]]


def _cfg(**sample):
    cfg = OmegaConf.to_object(OmegaConf.structured(TmlConfig))
    for k, v in sample.items():
        setattr(cfg.sample, k, v)
    return cfg


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="sample.audio=path"):
        run(_cfg(audio=None))
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(SystemExit, match="broken.wav"):
        run(_cfg(audio=str(bad), out=str(tmp_path)))
    with pytest.raises(SystemExit, match="sample.checkpoint=.*make run.*sample.checkpoint=none"):
        run(_cfg(audio=str(FIXTURE), checkpoint=str(tmp_path / "no_such_run"), out=str(tmp_path)))
