"""Parallelism applied from outside the model: a 4-axis device mesh and logical-axis
sharding rules.

    from tml.parallel import MeshConfig, make_mesh, DEFAULT_RULES, shard_model, shard_batch
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = shard_model(model, DEFAULT_RULES, mesh)
    out = nnx.jit(lambda m, b: m(b))(model, shard_batch(batch, mesh))
    with tensor_parallel(mesh, DEFAULT_RULES):      # row-parallel layers: TP-invariant bits
        out = nnx.jit(lambda m, b: m(b))(model, shard_batch(batch, mesh))
    with expert_parallel(mesh):                     # MoE dispatch: all-to-all over `expert`
        out = nnx.jit(lambda m, b: m(b))(model, shard_batch(batch, mesh))

``tml.parallel.config`` and ``tml.parallel.mesh`` are light (no JAX import at module
level) so configs load without starting JAX; the sharding functions are imported on
first use.
"""

from tml.parallel.config import DEFAULT_RULES, ParallelConfig, default_rules
from tml.parallel.mesh import AXES, MeshConfig, make_mesh

_LAZY = {
    name: "tml.parallel.sharding"
    for name in (
        "batch_sharding", "batch_spec", "bytes_per_device", "create_sharded", "logical_constraint", "logical_to_spec",
        "normalize_rules", "param_specs", "shard_batch", "shard_model", "state_shardings",
        "state_specs", "use_rules", "variable_spec",
    )
} | {name: "tml.parallel.tensor" for name in (
    "NOT_TP_INVARIANT", "ROW_PARALLEL_AXES", "TensorParallel", "invariant_rules", "row_parallel_mesh_axes",
    "tensor_parallel")} | {name: "tml.parallel.expert" for name in (
    "ExpertCapacityError", "ExpertParallel", "bound_expert_parallel", "dropped_assignments", "expert_parallel",
    "token_mesh_axes")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = [  # noqa: RUF022
    "AXES", "DEFAULT_RULES", "MeshConfig", "ParallelConfig", "default_rules", "make_mesh",
    "batch_sharding", "batch_spec", "bytes_per_device", "create_sharded", "logical_constraint",
    "logical_to_spec", "normalize_rules", "param_specs", "shard_batch", "shard_model",
    "state_shardings", "state_specs", "use_rules", "variable_spec",
    "NOT_TP_INVARIANT", "ROW_PARALLEL_AXES", "TensorParallel", "invariant_rules", "row_parallel_mesh_axes",
    "tensor_parallel",
    "ExpertCapacityError", "ExpertParallel", "bound_expert_parallel", "dropped_assignments", "expert_parallel",
    "token_mesh_axes",
]
assert set(__all__) >= set(_LAZY)
