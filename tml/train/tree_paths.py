"""Names of pytree leaves, shared by the weight-decay mask and the checkpoint layout."""

from __future__ import annotations

from typing import Any, Sequence

import jax


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """A JAX key path → component names: dict keys, attribute names, sequence indices.

    ``GetAttrKey("value")`` components (how NNX ``Variable`` boxes appear in key paths) are
    dropped, so ``nnx.State`` and its ``to_pure_dict()`` give the same names."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return tuple(names)


def path_str(path: Sequence[Any]) -> str:
    """A JAX key path → ``"blocks/0/attn/wq/w"``."""
    return "/".join(path_names(path))
