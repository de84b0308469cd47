"""Write a tiny directory in Full-Duplex-Bench's sample layout from the v1 parity fixtures.

Each task's samples of ``fixtures/fdb_v1/cases.json`` become ``<root>/<task>/<sample>/``
folders holding what FD-bench's scripts read (``output.json``, ``pause.json`` /
``turn_taking.json`` / ``interrupt.json``) plus a silent ``input.wav`` and ``output.wav``
as long as the timeline. ``reference(task, sample)`` is what FD-bench computed for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile

FIXTURES = Path(__file__).parent / "fixtures" / "fdb_v1"
CASES = json.loads((FIXTURES / "cases.json").read_text())
REFERENCE = json.loads((FIXTURES / "reference_outputs.json").read_text())
TASKS = ("pause_handling", "smooth_turn_taking", "user_interruption")


def write_task(root: Path, task: str) -> Path:
    """``root/<task>/<sample>/...`` for every fixture sample of ``task``; returns the task folder."""
    folder = root / task
    for case in CASES[task]:
        tl, files = case["timeline"], case["fdb_inputs"]
        d = folder / tl["sample_id"]
        d.mkdir(parents=True)
        silence = np.zeros(len(tl["model_speaking"]) * 3200, np.float32)
        soundfile.write(d / "input.wav", silence, 16_000)
        soundfile.write(d / "output.wav", silence, 16_000)
        for name, content in files.items():
            (d / name).write_text(json.dumps(content))
    return folder


def reference(task: str, sample_id: str) -> dict:
    return REFERENCE["tasks"][task]["per_sample"][sample_id]
