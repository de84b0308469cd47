"""Model-config fingerprint and the config guard (pure Python: the module uses no JAX).

**Config guard.** ``meta`` stores a fingerprint (sha256 of the canonical JSON) of the model
config and the flattened config itself. Restoring, or saving into a directory whose
checkpoints come from another model config, raises
:class:`~tml.train.checkpoint.errors.CheckpointConfigMismatchError` listing the differing
keys (:func:`mismatch_message`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping


def config_to_dict(cfg: Any) -> dict:
    """A dataclass / OmegaConf / mapping config → plain JSON-able dict (``None`` → ``{}``)."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model_config must be a dataclass, a mapping or an OmegaConf config, "
                        f"got {type(cfg).__name__}")
    return json.loads(json.dumps(cfg, sort_keys=True, default=repr))


def checkpointed_model_config(cfg: Any) -> dict:
    """The part of a model config a checkpoint depends on: :func:`config_to_dict` without
    the fields that only say how rows are computed
    (:data:`tml.model.config.COMPUTE_LAYOUT_FIELDS`: ``scan_layers``, ``remat``), so
    checkpoints written before they existed, or with them toggled, still match."""
    from tml.model.config import COMPUTE_LAYOUT_FIELDS

    return {k: v for k, v in config_to_dict(cfg).items() if k not in COMPUTE_LAYOUT_FIELDS}


def flatten_config(cfg: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists are leaves)."""

    def walk(d: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> dict[str, Any]:
        for k, v in d.items():
            if isinstance(v, Mapping) and v:
                walk(v, f"{prefix}{k}.", out)
            else:
                out[f"{prefix}{k}"] = v
        return out

    return walk(config_to_dict(cfg), "", {})


def config_fingerprint(cfg: Any) -> str:
    """16 hex digits of the sha256 of the config's canonical JSON."""
    canon = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differing keys of two flattened configs: ``[(key, saved_value, current_value)]``,
    with ``"<absent>"`` for a key only one side has."""
    absent = "<absent>"
    keys = sorted(set(saved) | set(current))
    return [(k, saved.get(k, absent), current.get(k, absent)) for k in keys
            if saved.get(k, absent) != current.get(k, absent)]


def mismatch_message(directory: Path, step: int, meta: Mapping[str, Any], *,
                     model_config: Mapping[str, Any], fingerprint: str, config_prefix: str,
                     saving: bool) -> str:
    """The :class:`CheckpointConfigMismatchError` text: up to 20 differing keys and an
    override hint (``<config_prefix>.d_model=256``) that resumes with the checkpoint's config."""
    saved = flatten_config(meta.get("model_config", {}))
    current = flatten_config(model_config)
    diff = config_diff(saved, current)
    lines = [f"  {k}: checkpoint {a!r}, current {b!r}" for k, a, b in diff[:20]]
    if len(diff) > 20:
        lines.append(f"  ... and {len(diff) - 20} more")
    hint = " ".join(f"{config_prefix}.{k}={json.dumps(a)}" for k, a, _ in diff[:5]
                    if a != "<absent>")
    what = ("refusing to save into" if saving else "cannot restore from")
    return (
        f"{what} {directory}: its checkpoint step {step} was written by a different "
        f"model config (fingerprint {meta.get('config_fingerprint')}, current "
        f"{fingerprint}). Differing keys:\n" + "\n".join(lines) + "\n"
        "To resume that run, launch with the checkpoint's model config"
        + (f" (e.g. {hint})" if hint else "") + "; to train this config, use a new "
        "checkpoint directory (or move the old checkpoints away).")
