"""``tml sample``: stream a user's own audio file through one sampler session, 200 ms at a
time, as if it arrived live, and write what the model did.

    tml sample sample.audio=me.m4a                        # the `make run` checkpoint (runs/tiny)
    tml sample sample.audio=me.flac sample.checkpoint=none sample.out=runs/sample_fresh

The file (any format and rate soundfile reads) goes through :func:`tml.audio.load_audio`
(mono, resampled to 16 kHz; a missing, corrupt or truncated file is an
:class:`~tml.audio.AudioError` naming it), is zero-padded to whole micro-turns and followed
by ``sample.tail_seconds`` of silence (room for the model to answer), then appended to one
:class:`~tml.sampler.Engine` session micro-turn by micro-turn (``Engine.step``), under a
progress bar. Outputs in ``sample.out``:

* ``conversation.wav`` — stereo 16 kHz, the model on channel ``sample.model_channel``
  (0 = left, as moshi-finetune lays out its conversations and ``tml data build data=moshi``
  reads them), the user on the other. The model's whole speech track is vocoded at once
  (Griffin–Lim, :func:`tml.audio.waveform_from_dmel`) rather than 200 ms at a time —
  phases then run on across micro-turns instead of restarting — and silenced where it did
  not speak.
* ``transcript.json`` — per micro-turn (``start``/``end`` seconds) the model's text, whether
  it spoke, its control tokens; plus ``alignments`` in moshi-finetune's per-file format
  (``[[word, [start, end], "SPEAKER_MAIN"]]``: a word spans its bytes' micro-turns);
  ``transcript.txt`` — the same, one line per micro-turn with text or control.
* ``timeline.png`` — who speaks when (user: micro-turns above an energy threshold; model:
  micro-turns with speech frames), the model's text written at its times.
* ``sample.json`` — the run: audio, checkpoint and step, micro-turns, tick latency
  p50/p99 against the 200 ms budget, real-time factor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from tml.files import atomic_write_bytes, atomic_write_json

MICRO_TURN_S = 0.2


def _load_model(cfg):
    from tml.eval.checkpoint import load_model

    try:
        return load_model(cfg.model, cfg.sample.checkpoint, seed=cfg.sample.seed)
    except FileNotFoundError as e:
        raise SystemExit(str(e).replace("eval.checkpoint", "sample.checkpoint")
                         .replace("evaluates an untrained model", "samples from fresh weights")
                         .replace("for an untrained model", "for fresh weights")) from None


def user_activity(audio: np.ndarray, n_turns: int) -> np.ndarray:
    """float32 [n_turns * 3200] → bool [n_turns]: the micro-turn's RMS is above 10% of the
    loudest micro-turn's (and above -50 dBFS)."""
    rms = np.sqrt((audio[:n_turns * 3200].reshape(n_turns, 3200).astype(np.float64) ** 2).mean(1))
    return rms > max(0.1 * rms.max(initial=0.0), 10 ** (-50 / 20))


def model_track(outputs, n_turns: int) -> np.ndarray:
    """The model's speech over the whole conversation, vocoded at once → float32
    [n_turns * 3200], zero in micro-turns without speech."""
    from tml.audio import waveform_from_dmel

    frames = np.zeros((n_turns * 4, 80), np.uint8)          # bin 0: the quietest mel value
    speaks = np.zeros(n_turns, bool)
    for o in outputs:
        if len(o.speech):
            frames[o.micro_turn * 4:(o.micro_turn + 1) * 4] = o.speech
            speaks[o.micro_turn] = True
    if not speaks.any():
        return np.zeros(n_turns * 3200, np.float32)
    wave = waveform_from_dmel(frames)[:n_turns * 3200]
    wave = np.pad(wave, (0, n_turns * 3200 - len(wave))).reshape(n_turns, 3200)
    wave[~speaks] = 0.0
    return np.clip(wave.reshape(-1), -1.0, 1.0).astype(np.float32)


def words(outputs) -> list:
    """The model's text as moshi-finetune alignments: [[word, [start, end], "SPEAKER_MAIN"]]."""
    out, cur, start, end = [], [], None, None
    for o in outputs:
        for b in o.text_bytes:
            ch = bytes([b])
            if ch.isspace():
                if cur:
                    out.append([b"".join(cur).decode("utf-8", "replace"), [start, end], "SPEAKER_MAIN"])
                cur = []
                continue
            if not cur:
                start = round(o.micro_turn * MICRO_TURN_S, 3)
            cur.append(ch)
            end = round((o.micro_turn + 1) * MICRO_TURN_S, 3)
    if cur:
        out.append([b"".join(cur).decode("utf-8", "replace"), [start, end], "SPEAKER_MAIN"])
    return out


def transcript(outputs) -> dict:
    turns = [{"micro_turn": o.micro_turn, "start": round(o.micro_turn * MICRO_TURN_S, 3),
              "end": round((o.micro_turn + 1) * MICRO_TURN_S, 3), "text": o.text, "speaking": bool(len(o.speech)),
              "control": list(o.control), "forced_end": bool(o.forced_end)} for o in outputs]
    return {"micro_turn_seconds": MICRO_TURN_S, "micro_turns": turns, "alignments": words(outputs),
            "text": "".join(o.text for o in outputs)}


def transcript_text(tr: dict) -> str:
    lines = []
    for t in tr["micro_turns"]:
        if not (t["text"] or t["control"]):
            continue
        stamp = f"[{t['start']:7.1f}s - {t['end']:7.1f}s]"
        extra = (" " + " ".join(t["control"])) if t["control"] else ""
        lines.append(f"{stamp} {t['text']!r}{extra}")
    return "\n".join(lines) + "\n"


def plot_timeline(path: Path, user: np.ndarray, model: np.ndarray, tr: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(user)
    fig, ax = plt.subplots(figsize=(max(8.0, min(40.0, n * MICRO_TURN_S * 0.8)), 2.8))
    for row, (active, color, label) in enumerate(((user, "tab:blue", "user"), (model, "tab:orange", "model"))):
        spans = [(i * MICRO_TURN_S, MICRO_TURN_S) for i in np.flatnonzero(active)]
        ax.broken_barh(spans, (1 - row - 0.35, 0.7), color=color, label=f"{label} speaks")
    for t in tr["micro_turns"]:
        label = "".join(c for c in t["text"] if c.isprintable()).strip() or " ".join(t["control"])
        if label:
            ax.text(t["start"], -0.55, label[:12], fontsize=6, rotation=60, va="top", ha="left")
    ax.set_yticks([1, 0], ["user", "model"])
    ax.set_ylim(-1.6, 1.6)
    ax.set_xlim(0, n * MICRO_TURN_S)
    ax.set_xlabel("seconds (200 ms micro-turns)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run(cfg) -> dict:
    """Stream ``cfg.sample.audio`` through a session (module docstring) → the sample.json dict."""
    from tqdm.auto import tqdm

    from tml import kernels
    from tml.audio import AudioError, load_audio, write_audio
    from tml.sampler import Engine, SamplingParams, TurnInputs
    from tml.stream import SAMPLES_PER_MICRO_TURN
    from tml.stream.micro_turns import pad_to_micro_turns

    sc = cfg.sample
    if not sc.audio:
        raise SystemExit("tml sample needs your audio file: sample.audio=path/to/file (any format and rate "
                         "soundfile reads, e.g. tests/audio/fixtures/speech_hello_22050.flac)")
    if sc.model_channel not in (0, 1):
        raise SystemExit(f"sample.model_channel={sc.model_channel}: 0 (left) or 1 (right)")
    if sc.tail_seconds < 0:
        raise SystemExit(f"sample.tail_seconds={sc.tail_seconds} must be >= 0")
    try:
        audio = load_audio(sc.audio, 16000)
    except AudioError as e:
        raise SystemExit(f"sample.audio: {e}") from None
    audio = pad_to_micro_turns(audio)
    audio = np.concatenate([audio, np.zeros(int(round(sc.tail_seconds / MICRO_TURN_S)) * SAMPLES_PER_MICRO_TURN,
                                            np.float32)])
    n_turns = len(audio) // SAMPLES_PER_MICRO_TURN
    model, loaded = _load_model(cfg)
    sampling = SamplingParams(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p, min_p=sc.min_p)
    per_turn = 8 + sc.max_output_tokens + len(sc.context.encode()) // max(n_turns, 1) + 1
    max_context = 64 * -(-(n_turns * per_turn + len(sc.context.encode()) + 64) // 64)
    ticks = []
    with kernels.kernel_mode(sc.kernel_mode):
        eng = Engine(model, max_sessions=1, max_context=max_context, sampling=sampling,
                     max_output_tokens=sc.max_output_tokens, vocoder=False)
        sid = eng.open(seed=sc.seed, context=sc.context or None)
        bar = tqdm(range(n_turns), unit="micro-turn", disable=not sc.progress, dynamic_ncols=True)
        for t in bar:
            t0 = time.perf_counter()
            eng.step(sid, TurnInputs(audio=audio[t * SAMPLES_PER_MICRO_TURN:(t + 1) * SAMPLES_PER_MICRO_TURN]))
            ticks.append((time.perf_counter() - t0) * 1e3)
        bar.close()
        outputs = eng.outputs(sid)
    out = Path(sc.out)
    out.mkdir(parents=True, exist_ok=True)
    model_wave = model_track(outputs, n_turns)
    stereo = np.zeros((len(audio), 2), np.float32)
    stereo[:, sc.model_channel], stereo[:, 1 - sc.model_channel] = model_wave, np.clip(audio, -1, 1)
    write_audio(out / "conversation.wav", stereo, 16000)
    tr = transcript(outputs)
    atomic_write_json(out / "transcript.json", {"audio": str(sc.audio), **tr})
    atomic_write_bytes(out / "transcript.txt", transcript_text(tr).encode())
    user_on = user_activity(audio, n_turns)
    model_on = np.array([bool(len(o.speech)) for o in outputs])
    if sc.plot:
        plot_timeline(out / "timeline.png", user_on, model_on, tr, f"{Path(sc.audio).name} — {loaded.describe()}")
    warm = np.asarray(ticks[1:] or ticks)
    summary = {"audio": str(sc.audio), "checkpoint": loaded.describe(), "step": loaded.step, "micro_turns": n_turns,
               "seconds": n_turns * MICRO_TURN_S, "kernel_mode": sc.kernel_mode, "seed": sc.seed,
               "model_channel": sc.model_channel, "model_speaking_micro_turns": int(model_on.sum()),
               "user_active_micro_turns": int(user_on.sum()), "model_text": tr["text"],
               "first_tick_ms": ticks[0], "tick_p50_ms": float(np.percentile(warm, 50)),
               "tick_p99_ms": float(np.percentile(warm, 99)), "budget_ms": MICRO_TURN_S * 1e3,
               "real_time_factor": float(np.sum(ticks) / 1e3 / (n_turns * MICRO_TURN_S)),
               "files": ["conversation.wav", "transcript.json", "transcript.txt"] + (["timeline.png"] if sc.plot else [])}
    atomic_write_json(out / "sample.json", summary)
    print(json.dumps({k: summary[k] for k in ("checkpoint", "micro_turns", "model_speaking_micro_turns",
                                              "tick_p50_ms", "tick_p99_ms", "real_time_factor")}, indent=1))
    print(f"wrote {out}/conversation.wav (model {'left' if sc.model_channel == 0 else 'right'}), transcript.json, "
          f"transcript.txt" + (", timeline.png" if sc.plot else ""))
    return summary
