"""A directory in Full-Duplex-Bench's own sample layout -> Timelines -> the v1 scorers.

The layout (FD-bench v1, ``v1_v1.5/evaluation``; the same one the parity fixtures in
``tests/eval/fixtures/fdb_v1`` were scored on): one folder per sample under the task's
directory, each holding

* ``input.wav`` -- the user's audio the model was played;
* ``output.wav`` -- the model's time-synchronous output audio (its length is the
  conversation's length: ``ceil(seconds * 5)`` micro-turns);
* ``output.json`` -- the ASR transcript of ``output.wav`` with word timestamps,
  ``{"text": ..., "chunks": [{"text": w, "timestamp": [start, end]}, ...]}`` (FD-bench's
  ``get_transcript/asr.py``; for user interruption it transcribes only what follows the
  interruption, offsets added back);
* the task's metadata: ``pause.json`` (pause handling, ``[{"timestamp": [s, e]}]``),
  ``turn_taking.json`` (smooth turn-taking, ``timestamp[0]`` = the user's turn end),
  ``interrupt.json`` (user interruption, ``timestamp`` = ``[start, end]``), or none of
  them (backchannel, whose reference timing histograms are FD-bench's
  ``icc_gt_distribution.json``, keyed by sample folder name).

The model's text channel is the transcript (one chunk = one word, as FD-bench counts).
Its speech activity per micro-turn -- FD-bench runs Silero VAD on ``output.wav`` for
backchannel -- is taken from the transcript: a micro-turn is speaking when a word
overlaps it (``tml.stream.to_micro_turns``' rule), so the backchannel scores here are
the VAD-free reading of the same samples and can differ from FD-bench's where the VAD
and the ASR disagree. No LLM rating is reproduced.

Running a policy on the folder instead (``eval.policy=model|untrained|silent``,
``tml.eval.run.run_fdb``): only ``input.wav`` and the task's metadata are read.
:func:`read_input` decodes ``input.wav`` with :func:`tml.audio.load_audio` (any rate and
channel count -> 16 kHz mono, padded with silence to whole 3,200-sample micro-turns),
the policy is streamed one micro-turn per tick, and :func:`policy_timeline` turns its
per-micro-turn outputs into the model side of the Timeline by the text-channel word rule
(:func:`tml.eval.scenarios.model_parts`: the model's text channel is the transcript,
its ``<speak>`` frames its speech activity); the same task scorer then scores it.

Bad samples (a missing file, unreadable JSON or audio, unordered or overlapping words, a
word after the audio ends) raise :class:`~tml.eval.scenarios.SampleError` naming the
folder and the file; :func:`iter_samples` and ``run_fdb`` record them and score the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from tml.eval.fdb_v1 import backchannel, load_backchannel_reference, pause_handling, smooth_turn_taking, user_interruption
from tml.eval.scenarios import MicroTurnOutput, SampleError, model_parts, scalars
from tml.eval.timeline import MICRO_TURNS_PER_S, Annotations, OverlapEvent, Timeline, TimelineError, Word

TASK_FILES = {"pause_handling": "pause.json", "smooth_turn_taking": "turn_taking.json",
              "user_interruption": "interrupt.json"}
"""The metadata file that marks each task's samples (backchannel: none)."""
TASKS = (*TASK_FILES, "backchannel")
REQUIRED = ("input.wav", "output.wav", "output.json")
REFERENCE_NAME = "icc_gt_distribution.json"
SAMPLE_RATE = 16_000
SAMPLES_PER_MICRO_TURN = SAMPLE_RATE // MICRO_TURNS_PER_S  # 3,200


def sample_dirs(root: str | Path) -> list[Path]:
    """The sample folders under ``root`` (every sub-folder holding any file), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"eval.fdb_dir={str(root)!r} is not a directory; point it at a Full-Duplex-Bench "
                                "task folder (one sub-folder per sample with input.wav, output.wav, output.json)")
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and any(p.iterdir())),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    if not dirs:
        raise FileNotFoundError(f"{root}: no sample folders (expected <sample>/input.wav, output.wav, output.json)")
    return dirs


def _json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text())
    except FileNotFoundError:
        raise SampleError(f"sample {folder.name!r}: {name} is missing in {folder}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError(f"sample {folder.name!r}: {name} is not valid JSON ({e})") from None


def detect_task(folder: Path) -> str:
    """The task a sample folder belongs to, from its metadata file (backchannel: none)."""
    found = [task for task, name in TASK_FILES.items() if (folder / name).exists()]
    if len(found) > 1:
        raise SampleError(f"sample {folder.name!r}: holds metadata of several tasks {found}; set eval.fdb_task")
    return found[0] if found else "backchannel"


def _words(folder: Path) -> list[Word]:
    out = _json(folder, "output.json")
    chunks = out.get("chunks") if isinstance(out, dict) else None
    if not isinstance(chunks, list):
        raise SampleError(f"sample {folder.name!r}: output.json has no 'chunks' list (FD-bench asr.py output)")
    words = []
    for i, c in enumerate(chunks):
        try:
            (s, e), text = c["timestamp"], str(c["text"]).strip()
            s, e = float(s), float(e)
        except (KeyError, TypeError, ValueError):
            raise SampleError(f"sample {folder.name!r}: output.json chunks[{i}] = {c!r} needs "
                              "'text' and 'timestamp': [start, end] in seconds") from None
        words.append(Word(text or "<empty>", s, e))
    return words


def _micro_turns(folder: Path) -> int:
    for name in REQUIRED:
        if not (folder / name).exists():
            raise SampleError(f"sample {folder.name!r}: {name} is missing in {folder}")
    try:
        info = soundfile.info(str(folder / "output.wav"))
    except RuntimeError as e:
        raise SampleError(f"sample {folder.name!r}: output.wav cannot be read ({e})") from None
    if info.frames == 0:
        raise SampleError(f"sample {folder.name!r}: output.wav is empty")
    return math.ceil(info.frames * MICRO_TURNS_PER_S / info.samplerate - 1e-9)


def timeline(folder: Path, task: str, reference: dict[str, tuple[float, ...]] | None = None) -> Timeline:
    """One sample folder -> its Timeline (module docstring); SampleError if it is malformed."""
    n = _micro_turns(folder)
    words = _words(folder)
    speaking = [False] * n
    for w in words:
        a = min(math.floor(w.start * MICRO_TURNS_PER_S + 1e-9), n - 1)
        b = min(math.floor(max(w.start, w.end - 1e-6) * MICRO_TURNS_PER_S + 1e-9), n - 1)
        for t in range(max(a, 0), b + 1):
            speaking[t] = True
    try:
        return Timeline(folder.name, tuple(speaking), tuple(words), annotations=annotations(folder, task, reference))
    except TimelineError as e:
        raise SampleError(f"sample {folder.name!r} ({task}): {e}") from None


def annotations(folder: Path, task: str, reference: dict[str, tuple[float, ...]] | None = None) -> Annotations:
    """The task's annotations from the sample's metadata json (module docstring)."""
    if task not in TASKS:
        raise ValueError(f"eval.fdb_task={task!r}: choose auto or one of {TASKS}")
    meta = TASK_FILES.get(task)
    try:
        if task == "pause_handling":
            ann = Annotations(pauses=tuple(tuple(float(x) for x in p["timestamp"]) for p in _json(folder, meta)))
        elif task == "smooth_turn_taking":
            ann = Annotations(turn_ends=(float(_json(folder, meta)[0]["timestamp"][0]),))
        elif task == "user_interruption":
            s, e = _json(folder, meta)[0]["timestamp"]
            ann = Annotations(overlaps=(OverlapEvent("user_interruption", float(s), float(e)),))
        else:
            ann = Annotations(backchannel_reference=None if reference is None else reference.get(folder.name))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise SampleError(f"sample {folder.name!r}: {meta} is not in FD-bench's layout ({type(e).__name__}: {e}); "
                          "expected [{\"timestamp\": [start, end], ...}]") from None
    return ann


def read_input(folder: Path) -> np.ndarray:
    """``input.wav`` as float32 16 kHz mono, zero-padded to whole micro-turns (3,200 samples).

    A missing, corrupt, truncated or empty file raises :class:`SampleError` with the reason."""
    from tml.audio import AudioError, load_audio

    path = folder / "input.wav"
    if not path.exists():
        raise SampleError(f"sample {folder.name!r}: input.wav is missing in {folder}")
    try:
        audio = load_audio(path, SAMPLE_RATE, mono=True)
    except AudioError as e:
        raise SampleError(f"sample {folder.name!r}: input.wav cannot be read ({e})") from None
    n = math.ceil(len(audio) / SAMPLES_PER_MICRO_TURN)
    return np.pad(audio, (0, n * SAMPLES_PER_MICRO_TURN - len(audio))).astype(np.float32)


def policy_timeline(folder: Path, task: str, outputs: list[MicroTurnOutput],
                    reference: dict[str, tuple[float, ...]] | None = None) -> Timeline:
    """A policy's per-micro-turn outputs on ``folder``'s input.wav -> the Timeline its task scores."""
    if not outputs:
        raise SampleError(f"sample {folder.name!r}: the policy produced no micro-turns")
    parts = model_parts(outputs)
    ann = annotations(folder, task, reference)
    try:
        return Timeline(folder.name, parts.speaking, parts.words, control_tokens=parts.control_tokens,
                        annotations=ann)
    except TimelineError as e:
        raise SampleError(f"sample {folder.name!r} ({task}): {e}") from None


def score_timeline(tl: Timeline, task: str) -> dict[str, Any]:
    """The FD-bench v1 scorer of ``task`` on one Timeline, scalars only.

    Backchannel without a reference histogram for this sample: TOR and frequency are
    scored, ``jsd`` is None (it needs FD-bench's ``icc_gt_distribution.json``).
    """
    if task == "pause_handling":
        return scalars(pause_handling(tl))
    if task == "smooth_turn_taking":
        return scalars(smooth_turn_taking(tl))
    if task == "user_interruption":
        return scalars(user_interruption(tl))
    if tl.annotations.backchannel_reference is None:
        r = scalars(backchannel(tl, reference=(1.0, 1.0)))  # TOR and frequency do not read it
        return {**r, "jsd": None}
    return scalars(backchannel(tl))


def find_reference(root: Path, path: str | None) -> dict[str, tuple[float, ...]] | None:
    """FD-bench's backchannel reference: ``path``, else ``icc_gt_distribution.json`` in ``root`` or its parent."""
    candidates = [Path(path)] if path else [root / REFERENCE_NAME, root.parent / REFERENCE_NAME]
    for c in candidates:
        if c.exists():
            return load_backchannel_reference(c, verify=False)
    if path:
        raise FileNotFoundError(f"eval.fdb_reference={path!r} does not exist")
    return None


def iter_samples(root: str | Path, task: str = "auto",
                 reference_path: str | None = None) -> Iterator[tuple[str, str, dict[str, Any] | None, str | None]]:
    """``(sample_id, task, scores or None, error or None)`` for every sample folder under ``root``."""
    root = Path(root)
    dirs = sample_dirs(root)
    reference = find_reference(root, reference_path)
    for folder in dirs:
        t = task
        try:
            if t == "auto":
                t = detect_task(folder)
            yield folder.name, t, score_timeline(timeline(folder, t, reference), t), None
        except (SampleError, ValueError) as e:
            yield folder.name, t, None, str(e)
