"""The ``data`` item: every process's loader state, gathered as JSON.

Each process reads its own shards, so its loader position is its own; a save stores all of
them (``{"per_process": [state_0, state_1, ...]}``, process order) and a restore hands each
process back its entry (or a merge of all, for loaders whose position does not depend on the
number of processes).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np


def gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (one collective if multi-process).

    The UTF-8 bytes are padded to the longest process's length, all-gathered as ``uint8``
    ``[n_processes, max_len]`` and cut back with the gathered lengths."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: raw.size] = raw
    allraw = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(allraw[i, : int(lengths[i].reshape(-1)[0])]).decode())
            for i in range(allraw.shape[0])]


def jsonable_state(state: Any) -> Any:
    """A loader state (``.to_dict()``, a dataclass, or JSON-able already; ``None`` kept) →
    plain JSON values."""
    if state is None:
        return None
    if hasattr(state, "to_dict"):
        state = state.to_dict()
    elif dataclasses.is_dataclass(state) and not isinstance(state, type):
        state = dataclasses.asdict(state)
    return json.loads(json.dumps(state))
