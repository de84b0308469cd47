"""Ingestion of a moshi-finetune style corpus written by the test itself.

Layout (see data_pipelines/ingest.py): ``corpus.jsonl`` with {"path", "duration"} per
line, stereo audio with the assistant on channel 0 (left), ``<stem>.json`` next to each
audio file with {"alignments": [[word, [start, end], speaker], ...]}, optional video
``<video_dir>/<stem>.npy``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tml.data_pipelines.ingest import Reject, conversation_key, iter_moshi_corpus
from tml.stream.conversation import SAMPLE_RATE, VIDEO_FPS, Conversation

# Distinguishable channels: a tone per channel, different frequencies per file.
GOOD = {
    # name: (relative path, sample rate, seconds, left Hz, right Hz, format)
    "a": ("data_stereo/a.wav", 16_000, 3.0, 440.0, 1000.0, "WAV"),
    "b": ("data_stereo/b.flac", 44_100, 2.5, 300.0, 2000.0, "FLAC"),  # exercises resampling
    "c": ("more/c.v1.wav", 22_050, 2.0, 600.0, 1500.0, "WAV"),  # dotted stem, absolute path, video
}


def _stereo(sr: float, seconds: float, f_left: float, f_right: float, seed: int) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    noise = np.random.default_rng(seed).normal(0, 0.01, (len(t), 2))
    x = np.stack([0.5 * np.sin(2 * np.pi * f_left * t), 0.3 * np.sin(2 * np.pi * f_right * t)], 1)
    return (x + noise).astype(np.float32)


def _write_audio(path: Path, x: np.ndarray, sr: int, fmt: str = "WAV") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, sr, format=fmt, subtype="PCM_16")


def _write_align(audio: Path, alignments) -> None:
    audio.with_suffix(".json").write_text(json.dumps({"alignments": alignments}))


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Writes the corpus; returns (manifest path, video dir, expected outcome per line)."""
    root = tmp_path_factory.mktemp("corpus")
    vdir = root / "video"
    vdir.mkdir()
    lines: list[str] = []
    expect: list[tuple[str, str]] = []  # ("ok", name) or ("reject", substring of reason)

    def entry(rel: str, duration: float, outcome: tuple[str, str], absolute=False):
        lines.append(json.dumps({"path": str(root / rel) if absolute else rel, "duration": duration}))
        expect.append(outcome)

    # --- good conversations ----------------------------------------------------------
    for i, (name, (rel, sr, sec, fl, fr, fmt)) in enumerate(GOOD.items()):
        _write_audio(root / rel, _stereo(sr, sec, fl, fr, seed=i), sr, fmt)
        entry(rel, sec + 0.04, ("ok", name), absolute=(name == "c"))  # within 0.1 s
    # a: unsorted words with whisper-style leading spaces, two user labels, a zero-length
    # word, a whitespace-only token (dropped) and a word 5 ms past the end (clipped).
    _write_align(root / GOOD["a"][0], [
        [" how", [0.90, 1.10], "SPEAKER_1"],
        [" Hello", [0.10, 0.40], "SPEAKER_MAIN"],
        [" there.", [0.45, 0.80], "SPEAKER_MAIN"],
        ["uh", [1.20, 1.20], "SPEAKER_2"],
        [" ", [1.30, 1.40], "SPEAKER_1"],
        [" bye", [2.80, 3.005], "SPEAKER_MAIN"],
    ])
    _write_align(root / GOOD["b"][0], [[" ok", [0.5, 0.9], "SPEAKER_MAIN"]])
    _write_align(root / GOOD["c"][0], [])
    frames = np.random.default_rng(7).integers(0, 256, (int(2.0 * VIDEO_FPS), 48, 64, 3), dtype=np.uint8)
    np.save(vdir / "c.v1.npy", frames)

    # --- bad entries -------------------------------------------------------------------
    x = _stereo(16_000, 3.0, 440, 1000, seed=9)
    _write_audio(root / "bad/trunc.wav", x, 16_000)
    raw = (root / "bad/trunc.wav").read_bytes()
    (root / "bad/trunc.wav").write_bytes(raw[: len(raw) // 2])  # header still says 3 s
    _write_align(root / "bad/trunc.wav", [])
    entry("bad/trunc.wav", 3.0, ("reject", "truncated"))

    _write_audio(root / "bad/mono.wav", x[:, :1], 16_000)
    _write_align(root / "bad/mono.wav", [])
    entry("bad/mono.wav", 3.0, ("reject", "channel count"))

    _write_audio(root / "bad/noalign.wav", x, 16_000)
    entry("bad/noalign.wav", 3.0, ("reject", "missing alignment"))

    _write_audio(root / "bad/pastend.wav", x, 16_000)
    _write_align(root / "bad/pastend.wav", [["late", [2.9, 3.5], "SPEAKER_MAIN"]])
    entry("bad/pastend.wav", 3.0, ("reject", "outside the audio"))

    garbage = '{"path": "bad/x.wav", "duration": 3.0'  # unterminated JSON
    lines.append(garbage)
    expect.append(("reject", "GARBAGE"))

    entry("bad/missing.wav", 3.0, ("reject", "audio file not found"))

    (root / "bad/corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 50)
    _write_align(root / "bad/corrupt.wav", [])
    entry("bad/corrupt.wav", 3.0, ("reject", "corrupt"))

    _write_audio(root / "bad/reversed.wav", x, 16_000)
    _write_align(root / "bad/reversed.wav", [["back", [1.5, 1.0], "SPEAKER_MAIN"]])
    entry("bad/reversed.wav", 3.0, ("reject", "start 1.500 s > end 1.000 s"))

    _write_audio(root / "bad/badjson.wav", x, 16_000)
    (root / "bad/badjson.json").write_text('{"alignments": [["a", [0.1, 0.2], "SPEAKER_MAIN"]')
    entry("bad/badjson.wav", 3.0, ("reject", "malformed alignment JSON"))

    _write_audio(root / "bad/shape.wav", x, 16_000)
    _write_align(root / "bad/shape.wav", [["x", [0.1, 0.2]]])  # no speaker
    entry("bad/shape.wav", 3.0, ("reject", "malformed alignment JSON: alignment entry 0"))

    _write_audio(root / "bad/longer.wav", x, 16_000)
    _write_align(root / "bad/longer.wav", [])
    entry("bad/longer.wav", 3.5, ("reject", "duration mismatch"))

    _write_audio(root / "bad/video.wav", x, 16_000)
    _write_align(root / "bad/video.wav", [])
    np.save(vdir / "video.npy", np.zeros((30, 8, 8), np.uint8))  # no RGB axis
    entry("bad/video.wav", 3.0, ("reject", "bad video"))

    entry("data_stereo/a.wav", 3.0, ("reject", "duplicate manifest entry"))

    manifest = root / "corpus.jsonl"
    file_lines = lines[:3] + [""] + lines[3:]  # a blank line is skipped, but counted
    manifest.write_text("\n".join(file_lines) + "\n")
    lineno = file_lines.index(garbage) + 1
    expect = [(k, f"manifest line {lineno}: not valid JSON" if v == "GARBAGE" else v) for k, v in expect]
    return manifest, vdir, expect


def _run(manifest, vdir, **kw):
    return list(iter_moshi_corpus(manifest, video_dir=vdir, **kw))


def test_outcomes_per_entry(corpus):
    manifest, vdir, expect = corpus
    out = _run(manifest, vdir)
    assert len(out) == len(expect)
    for item, (kind, what) in zip(out, expect):
        if kind == "ok":
            assert isinstance(item, Conversation), (what, item)
        else:
            assert isinstance(item, Reject), (what, item)
            assert what in item.reason, (what, item)
    by_reason = {r.reason.split(":")[0]: r.path for r in out if isinstance(r, Reject)}
    assert by_reason["missing alignment file (expected next to the audio, same stem, .json)"].endswith(
        "noalign.json"
    )
    assert by_reason["manifest line 9"] == str(manifest)


def test_channels_resampling_words_video(corpus):
    manifest, vdir, _ = corpus
    convs = {c.meta["source"].split("/")[-1].split(".")[0]: c
             for c in _run(manifest, vdir) if isinstance(c, Conversation)}
    assert sorted(convs) == ["a", "b", "c"]
    for name, (rel, sr, sec, f_left, f_right, _) in GOOD.items():
        c = convs[name]
        c.validate()
        assert c.scenario == "real"
        assert c.meta["orig_sample_rate"] == sr
        assert c.model_audio.dtype == np.float32 and c.user_audio.dtype == np.float32
        # resampled length: the same duration at 16 kHz (+-1 sample)
        assert abs(len(c.model_audio) - sec * SAMPLE_RATE) <= 1, (name, len(c.model_audio))
        # left channel (assistant) -> model_audio, right -> user_audio; tones keep pitch
        assert abs(_peak_hz(c.model_audio, SAMPLE_RATE) - f_left) < 2, name
        assert abs(_peak_hz(c.user_audio, SAMPLE_RATE) - f_right) < 2, name
        assert "." not in c.id and "/" not in c.id and c.id == conversation_key(rel)

    a = convs["a"]
    assert [(w.text, w.speaker) for w in a.words] == [
        ("Hello", "model"), ("there.", "model"), ("how", "user"), ("uh", "user"), ("bye", "model"),
    ]
    assert a.words[-1].end == pytest.approx(3.0)  # 3.005 clipped to the audio
    assert [(e.kind, e.time, e.text) for e in a.events] == [
        ("model_text", 0.10, "Hello"), ("model_text", 0.45, "there."), ("model_text", 2.80, "bye"),
    ]
    assert a.video is None and convs["b"].video is None
    v = convs["c"].video
    assert v is not None and v.dtype == np.uint8 and v.shape == (20, 48, 64, 3)
    assert convs["c"].meta["source"] == "more/c.v1.wav"  # absolute manifest path, keyed relative
    assert len({c.id for c in convs.values()}) == 3


def test_assistant_channel_swaps(corpus):
    manifest, vdir, _ = corpus
    c = next(c for c in _run(manifest, vdir, assistant_channel=1) if isinstance(c, Conversation))
    assert abs(_peak_hz(c.model_audio, SAMPLE_RATE) - 1000.0) < 2
    assert abs(_peak_hz(c.user_audio, SAMPLE_RATE) - 440.0) < 2


def test_deterministic_order(corpus):
    manifest, vdir, _ = corpus

    def summary():
        return [
            (c.id, c.model_audio.tobytes(), tuple(c.words)) if isinstance(c, Conversation)
            else (c.path, c.reason)
            for c in _run(manifest, vdir)
        ]

    assert summary() == summary()


def test_usage_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        iter_moshi_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(ValueError, match="assistant_channel"):
        iter_moshi_corpus(tmp_path / "m.jsonl", assistant_channel=2)
    assert list(iter_moshi_corpus(tmp_path / "m.jsonl")) == []


def test_conversation_key():
    k = conversation_key("data_stereo/a.b.wav")
    assert k.startswith("data_stereo_a_b-") and "." not in k
    assert conversation_key("a.b/c.wav") != conversation_key("a_b/c.wav")
    assert conversation_key("x.wav") != conversation_key("x.flac")
    assert conversation_key("data_stereo/a.b.wav") == k


def test_slices_of_the_manifest_give_the_same_items(corpus):
    manifest, vdir, expect = corpus
    n = len(manifest.read_text().splitlines())
    whole = _run(manifest, vdir)
    parts = [item for a in range(0, n, 4) for item in _run(manifest, vdir, lines=(a, min(a + 4, n)))]
    assert [getattr(x, "id", None) or x.reason for x in parts] == \
           [getattr(x, "id", None) or x.reason for x in whole]


def test_build_ingests_into_shards_with_a_rejects_report(corpus, tmp_path):
    from tml.config import DataConfig
    from tml.data_pipelines.build import build_corpus
    from tml.data_pipelines.loader import decode_shard

    manifest, vdir, expect = corpus
    cfg = DataConfig(source="moshi", manifest=str(manifest), video_dir=str(vdir),
                     out_dir=str(tmp_path / "shards"), conversations_per_shard=5, workers=2)
    res = build_corpus(cfg, progress=False)
    m = res.manifest
    assert m["conversations"] == sum(k == "ok" for k, _ in expect) == 3
    assert m["splits"]["train"]["scenarios"] == {"real": 3}
    rejects = [json.loads(l) for l in (tmp_path / "shards" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == m["rejects"] == sum(k == "reject" for k, _ in expect)
    assert any("truncated" in r["reason"] and r["path"].endswith("trunc.wav") for r in rejects)
    convs = [c for s in m["shards"] for c, _ in decode_shard(tmp_path / "shards" / s["name"], s["sha256"])]
    assert sorted(c.scenario for c in convs) == ["real"] * 3
    assert sum(c.video is not None for c in convs) == 1
    again = build_corpus(cfg, progress=False)
    assert again.written == 0 and again.manifest == m
