"""Array trees ↔ what Orbax stores: nested dicts keyed by path names, typed PRNG keys as
their key data, and the abstract (shape, dtype, sharding) trees a restore reads into.

**Layout.** Array trees are stored as nested dicts keyed by the tree's path names
(attribute names, dict keys, sequence indices; the ``.value`` of NNX Variables dropped, see
:func:`tml.train.tree_paths.path_names`), so the on-disk format does not depend on container
types: a checkpoint written from an ``nnx.State`` restores into a plain dict target and vice
versa. A bare array as the whole tree is stored under the name ``_``.

**Typed PRNG keys** (``jax.random.key``) are stored as their ``key_data`` (``uint32``, shape
``key.shape + impl_shape``, e.g. ``(2,)`` per threefry key); :func:`to_storable` returns their
implementations (``{"a/b": "threefry2x32"}``, kept in ``meta``) and :func:`from_storable`
re-wraps them.

**Restore onto any mesh.** Restore targets are trees shaped like what was saved whose
leaves are ``jax.ShapeDtypeStruct`` (with ``.sharding``) or arrays (their ``.sharding`` is
used, their values ignored); e.g. ``nnx.state(nnx.eval_shape(...))`` with shardings attached
by :func:`with_shardings`. Orbax reads each shard straight into the target sharding, so a
checkpoint written on one mesh restores onto another. A leaf without a sharding is restored
replicated on all devices; a ``numpy`` leaf as a host array (:func:`abstract_leaf`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from tml.train.checkpoint.errors import CheckpointStructureError
from tml.train.tree_paths import path_names

Names = tuple[str, ...]
_SCALARS = (int, float, bool, np.number, np.bool_)


def is_key_dtype(dtype) -> bool:
    """``dtype`` is a typed PRNG key dtype (``jax.random.key``)."""
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def nest(flat: dict[Names, Any]) -> dict:
    """``{("a", "b"): x}`` → ``{"a": {"b": x}}``; two leaves on one path are an error."""
    out: dict = {}
    for names, leaf in flat.items():
        d = out
        for n in names[:-1]:
            d = d.setdefault(n, {})
            if not isinstance(d, dict):
                raise CheckpointStructureError(f"path {'/'.join(names)} collides with a leaf")
        if names[-1] in d:
            raise CheckpointStructureError(f"two leaves map to the same path {'/'.join(names)}")
        d[names[-1]] = leaf
    return out


def flat_paths(tree: Any) -> list[tuple[Names, Any]]:
    """``[(path names, leaf)]`` in ``jax.tree`` leaf order."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    out = []
    for path, leaf in leaves:
        names = path_names(path)
        if not names:
            names = ("_",)  # a bare array as the whole tree
        out.append((names, leaf))
    return out


def to_storable(tree: Any) -> tuple[dict, dict[str, str]]:
    """Any pytree → (nested dict of arrays, ``{"a/b": key_impl}`` for typed PRNG keys)."""
    flat, key_impls = {}, {}
    for names, leaf in flat_paths(tree):
        if isinstance(leaf, _SCALARS):
            leaf = np.asarray(leaf)
        if is_key_dtype(getattr(leaf, "dtype", None)):
            key_impls["/".join(names)] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        flat[names] = leaf
    return nest(flat), key_impls


def _replicated_sharding() -> jax.sharding.Sharding:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("_all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract_leaf(leaf: Any) -> Any:
    """A target leaf → what Orbax restores into (ShapeDtypeStruct with sharding, or numpy)."""
    if isinstance(leaf, np.ndarray) or isinstance(leaf, _SCALARS):
        return np.asarray(leaf)
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        raise CheckpointStructureError(f"restore target leaf of type {type(leaf).__name__} is not "
                                       f"an array or jax.ShapeDtypeStruct")
    sharding = getattr(leaf, "sharding", None) or _replicated_sharding()
    if is_key_dtype(dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_storable(flat: list[tuple[Names, Any]]) -> dict:
    """A flattened restore target → the nested abstract dict Orbax restores into."""
    return nest({names: abstract_leaf(leaf) for names, leaf in flat})


def from_storable(stored: dict, target: Any, key_impls: dict[str, str]) -> Any:
    """A restored nested dict → a tree with ``target``'s structure; key data whose target
    leaf is a typed key is re-wrapped with its saved implementation."""
    leaves = []
    for names, tleaf in flat_paths(target):
        leaf = stored
        for n in names:
            leaf = leaf[n]
        path = "/".join(names)
        if path in key_impls and is_key_dtype(getattr(tleaf, "dtype", None)):
            leaf = jax.random.wrap_key_data(leaf, impl=key_impls[path])
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def stored_shape(leaf: Any) -> tuple[int, ...]:
    """The shape ``leaf`` has on disk (a typed key's key-data shape)."""
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    if is_key_dtype(getattr(leaf, "dtype", None)):
        shape = tuple(jax.eval_shape(jax.random.key_data,
                                     jax.ShapeDtypeStruct(shape, leaf.dtype)).shape)
    return shape


def structure_mismatch(saved_metadata: Any, flat: list[tuple[Names, Any]]) -> list[str]:
    """How a flattened target differs from a checkpoint item's Orbax metadata tree (leaves
    with ``.shape``): missing names, extra names, different shapes (up to 10 of each);
    ``[]`` if they match."""
    saved = {"/".join(path_names(p)): getattr(m, "shape", None)
             for p, m in jax.tree_util.tree_leaves_with_path(
                 saved_metadata, is_leaf=lambda x: hasattr(x, "shape"))}
    target = {"/".join(names): stored_shape(leaf) for names, leaf in flat}
    missing = sorted(set(target) - set(saved))
    extra = sorted(set(saved) - set(target))
    shapes = sorted(k for k in set(saved) & set(target)
                    if saved[k] is not None and tuple(saved[k]) != target[k])
    parts = []
    if missing:
        parts.append(f"in the target but not the checkpoint: {missing[:10]}")
    if extra:
        parts.append(f"in the checkpoint but not the target: {extra[:10]}")
    if shapes:
        parts.append("different shapes (checkpoint vs target): " + ", ".join(
            f"{k} {tuple(saved[k])} vs {target[k]}" for k in shapes[:10]))
    return parts


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attach shardings to an abstract tree: ``shardings`` is one ``Sharding`` for all
    leaves, a tree of them shaped like ``abstract``, or ``fn(path_str, leaf) -> Sharding``."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings),
                            abstract)
    if callable(shardings):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                              sharding=shardings("/".join(path_names(p)), x)),
            abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
