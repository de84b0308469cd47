"""``tml eval`` configuration (no JAX, no numpy: ``tml.config`` imports it to compose recipes).

Recipes: ``recipes/eval/scenarios.yaml`` (the default: held-out synthetic scenarios) and
``recipes/eval/fdb.yaml`` (a directory in Full-Duplex-Bench's own sample layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class EvalConfig:
    """What ``tml eval`` runs, on what, and where it writes (``recipes/eval/``)."""

    policy: str = "oracle"                 # oracle | silent | model
    source: str = "scenarios"              # scenarios (synthetic, held out) | fdb (a Full-Duplex-Bench folder)
    out: str = "runs/eval"                 # <out>/eval.json and <out>/*.png
    checkpoint: str = "runs/tiny/checkpoints"  # policy=model: the checkpoint `make run` writes
    # scenarios: `per_scenario` held-out conversations of each scenario, indices
    # tml.eval.scenarios.HELD_OUT_INDEX_OFFSET + k, generator seed `seed`
    seed: int = 0
    per_scenario: int = 4
    scenarios: list[str] = field(default_factory=list)  # empty = every scenario
    batch_size: int = 8                    # sessions live at once
    # fdb: the directory holding per-sample folders (input.wav, output.wav, output.json, task json)
    fdb_dir: Optional[str] = None
    fdb_task: str = "auto"                 # auto (from each sample's json) | pause_handling | smooth_turn_taking |
    #                                        user_interruption | backchannel
    fdb_reference: Optional[str] = None    # icc_gt_distribution.json (backchannel JSD); default: looked up in fdb_dir
    plots: bool = True
    progress: bool = True
