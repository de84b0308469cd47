"""Tensor parallelism with TP-degree-invariant bits: which mesh axis splits the
contraction of the row-parallel layers, decided here, outside the model.

The model's row-parallel layers (attention ``wo``, the dense MLP ``down``, the MoE
expert ``down``) call :func:`tml.kernels.row_parallel_linear` with the *logical* name of
their contraction axis (:data:`ROW_PARALLEL_AXES`). Unbound, that is the canonical-chunk
matmul on one device; inside :func:`tensor_parallel` the names are mapped to mesh axes
by the same sharding rules that place the parameters, and the kernel runs a
``shard_map`` over that axis with an ordered reduction (one-shot: all-gather the C
canonical partials and sum them locally in one fixed tree; two-shot: reduce-scatter in
the same order, then all-gather)::

    mesh = make_mesh(MeshConfig(data=-1, tensor=4))
    model = shard_model(model, DEFAULT_RULES, mesh)
    with tensor_parallel(mesh, DEFAULT_RULES):
        out = nnx.jit(lambda m, b: m(b))(model, shard_batch(batch, mesh))

Bits (tests/parallel, tests/sampler/test_tp_alignment.py, 8 fake CPU devices): the
row-parallel outputs are bitwise those of one device at TP = 1, 2, 4, 8 in
``batch_invariant`` mode; in ``standard`` mode the reduction is ``psum`` and they differ.
The binding is part of every jit cache key (like the kernel mode), so a program traced
outside the block is never reused inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tml.kernels.collectives import ALGORITHMS, row_parallel_axes
from tml.parallel.sharding import Rules, normalize_rules

#: Logical names of the contractions tensor parallelism splits (rows of ``wo``, of the
#: MLP ``down`` and of the expert ``w_down``).
ROW_PARALLEL_AXES: tuple[str, ...] = ("q_heads", "mlp", "expert_mlp")


def row_parallel_mesh_axes(mesh, rules: Rules | None = None) -> dict[str, str | None]:
    """``{logical contraction axis: mesh axis or None}`` from the rules: the rule's first
    mesh axis of size > 1. A contraction split over two mesh axes at once is refused
    (the canonical chunks are cut along one axis)."""
    table = normalize_rules(rules, mesh)
    sizes = dict(mesh.shape)
    out: dict[str, str | None] = {}
    for name in ROW_PARALLEL_AXES:
        axes = [a for a in table.get(name, ()) if sizes[a] > 1]
        if len(axes) > 1:
            raise ValueError(f"rule {name!r} -> {axes} splits a row-parallel contraction over several mesh "
                             f"axes; map it to one axis (e.g. {name}: {axes[0]})")
        out[name] = axes[0] if axes else None
    return out


@contextlib.contextmanager
def tensor_parallel(mesh, rules: Rules | None = None, *, algorithm: str = "one_shot") -> Iterator[None]:
    """Run the row-parallel layers traced inside the block over ``mesh`` as the rules
    say (``None`` = :data:`~tml.parallel.DEFAULT_RULES`: heads / MLP width on
    ``tensor``). algorithm: ``"one_shot"`` (default) or ``"two_shot"``, same bits."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    with row_parallel_axes(mesh, row_parallel_mesh_axes(mesh, rules), algorithm=algorithm):
        yield


#: Logical axes that :func:`invariant_rules` keeps off the mesh, with the measured reason
#: (tiny model, 8 fake CPU devices, ``batch_invariant``; see tests/sampler/test_tp_alignment.py):
#: sharded, each changed the logits' bits at TP = 2 or 4 while everything else was bitwise.
NOT_TP_INVARIANT: dict[str, str] = {
    "mel_vocab": "the dMel embedding (a one-hot matmul) contracts the sharded table rows, which GSPMD psums",
    "patch_out": "the next hMLP layer contracts the sharded width, which GSPMD psums",
}


def invariant_rules(rules: Rules | None = None) -> dict:
    """``rules`` (default :data:`~tml.parallel.DEFAULT_RULES`) with the axes of
    :data:`NOT_TP_INVARIANT` replicated: the layout under which a tensor-parallel program
    gives the single-device bits (heads, MLP and expert widths on ``tensor`` — the expert
    down projection is row-parallel inside :func:`tml.kernels.moe_ffn` since it takes the
    logical ``axis="expert_mlp"``; experts may still be split over ``expert``, which
    contracts nothing)."""
    table = dict(normalize_rules(rules))
    table.update({name: () for name in NOT_TP_INVARIANT})
    return table


class TensorParallel:
    """A mesh, rules and algorithm for a program run outside the trainer (the sampler):
    ``place`` puts a model state on the mesh by its logical axes, ``replicate`` any
    arrays, and ``binding()`` is the :func:`tensor_parallel` block to call the jitted
    program in. rules: default :func:`invariant_rules`."""

    def __init__(self, mesh, rules: Rules | None = None, *, algorithm: str = "one_shot"):
        self.mesh, self.algorithm = mesh, algorithm
        self.rules = invariant_rules() if rules is None else normalize_rules(rules, mesh)

    def place(self, state):
        import jax

        from tml.parallel.sharding import state_shardings

        return jax.device_put(state, state_shardings(state, self.rules, self.mesh))

    def replicate(self, tree):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def binding(self):
        return tensor_parallel(self.mesh, self.rules, algorithm=self.algorithm)
