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

    policy: str = "oracle"                 # oracle | silent | model | untrained; source=fdb also: outputs
    #                                        (score the folder's own output.json; oracle means the same there).
    #                                        recipes/eval/fdb.yaml defaults to model (runs it on each input.wav)
    source: str = "scenarios"              # scenarios (synthetic, held out) | fdb (a Full-Duplex-Bench folder)
    out: str = "runs/eval/{policy}"        # <out>/eval.json and <out>/*.png ({policy} = the policy's name)
    # policy=model: a training run dir (`make run` writes runs/tiny), its checkpoints/ dir or
    # one step dir (checkpoints/<step>); `none` = a fresh model (train.seed), as policy=untrained
    checkpoint: str = "runs/tiny"
    # scenarios: `per_scenario` held-out conversations of each scenario, indices
    # tml.eval.scenarios.HELD_OUT_INDEX_OFFSET + k, generator seed `seed`
    seed: int = 0
    per_scenario: int = 4
    scenarios: list[str] = field(default_factory=list)  # empty = every scenario
    # > 0: each of the per_scenario samples is a minutes-long episode instead -- held-out
    # conversations of its scenario back to back until it lasts this long, the user
    # reacting to the model (tml.eval.long_episodes; policy=model | untrained)
    episode_seconds: float = 0.0
    user_reacts: bool = True               # long episodes: stop when talked over, ask an ignored question again
    max_context: int = 0                   # KV slots per session; 0 = 4096, or what the longest long episode may need
    batch_size: int = 8                    # sessions live at once (policy=model: per engine tick)
    # policy=model / untrained: the sampler (tml.eval.policies.ModelSampling). temperature 0 =
    # greedy (reproducible); above 0 each sample draws counter-based from its seed (eval.seed ^ index)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_output_tokens: int = 16            # per micro-turn, <end> included
    inputs: str = "audio"                  # audio (3,200 samples / micro-turn) | dmel (the corpus' bins)
    kernel_mode: str = "batch_invariant"   # batch_invariant | standard
    # fdb: the directory holding per-sample folders (input.wav and the task json; output.wav and
    # output.json too for policy=outputs)
    fdb_dir: Optional[str] = None
    fdb_task: str = "auto"                 # auto (from each sample's json) | pause_handling | smooth_turn_taking |
    #                                        user_interruption | backchannel
    fdb_reference: Optional[str] = None    # icc_gt_distribution.json (backchannel JSD); default: looked up in fdb_dir
    plots: bool = True
    progress: bool = True
