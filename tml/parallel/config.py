"""Structured config of the parallel layout (light: no JAX import).

``ParallelConfig`` is meant to sit in the top-level Hydra schema (e.g. a ``parallel``
field of ``tml.config.TmlConfig``) so a recipe or the command line picks the mesh and
overrides single rules::

    tml train run parallel.mesh.fsdp=2 parallel.mesh.data=-1 parallel.rules.vocab=null

``rules`` values are a mesh-axis name, a list of them, or null (replicated); they are
checked by :func:`tml.parallel.sharding.normalize_rules` when used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tml.parallel.mesh import MeshConfig

#: Default logical-name → mesh-axes rules (MaxText-like). Parameter names first (every
#: name used by ``tml.model``), then activation names for ``logical_constraint``.
DEFAULT_RULES: dict[str, Any] = {
    # parameters
    "embed": "fsdp",                    # model width: FSDP-sharded, gathered for use
    "q_heads": "tensor",                # attention heads (columns of wq, rows of wo)
    "kv_heads": "tensor",
    "mlp": "tensor",                    # dense SwiGLU width
    "experts": "expert",                # MoE expert index
    "expert_mlp": "tensor",             # expert SwiGLU width
    "vocab": "tensor",                  # text vocabulary (embedding rows, head columns)
    "mel_vocab": "tensor",              # dMel table rows / speech head columns
    "patch_in": "fsdp",                 # hMLP fold-to-depth inputs
    "patch_out": "tensor",              # hMLP layer outputs
    "modality": None,                   # 8-row modality table
    "norm": None,                       # RMSNorm scales
    # activations
    "batch": ["data", "fsdp", "expert"],  # every batch-splitting axis (expert ranks too,
    #                                       or they would repeat the dense compute)
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def default_rules() -> dict[str, Any]:
    """A fresh copy of :data:`DEFAULT_RULES` (lists copied too)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in DEFAULT_RULES.items()}


@dataclass
class ParallelConfig:
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rules: dict[str, Any] = field(default_factory=default_rules)
    devices: int = 0                   # use the first N devices (0 = all; single process only)
