"""Shared plumbing for the Pallas kernels: flavours, interpret mode, export.

Two flavours of every kernel:

* ``"tpu"``  — Mosaic TPU lowering (``pltpu.CompilerParams``); block shapes obey the
  TPU (8, 128) tiling rule. On CPU this flavour runs in ``interpret=True`` mode and
  is the one whose bits are compared with the jnp reference.
* ``"triton"`` — GPU lowering through Pallas' Triton backend
  (``pallas.triton.CompilerParams``), for "cuda" and "rocm"; block shapes are powers
  of two. In this JAX version (0.10) the *default* GPU lowering is Mosaic GPU, which
  cannot lower these kernels ("Unimplemented primitive in Pallas Mosaic GPU lowering:
  dot_general for lowering semantics Lane": Mosaic GPU wants warpgroup-level
  kernels) and does not support ROCm at all, so the GPU flavour selects Triton
  explicitly.

The two flavours run the same algorithm; they differ only where a backend cannot
express a step the other way: Triton cannot slice a value held in registers, so the
pairwise tree over a row is spelled ``reshape(2, h).sum(0)`` instead of
``x[:h] + x[h:]`` (same additions, same order). When the Triton flavour is run in
interpret mode on CPU, an ``optimization_barrier`` after every tree level keeps XLA
from folding the reshape+sum levels into one reduce (which would reorder them).

``jax.export`` of a Triton kernel needs ``DisabledSafetyCheck.custom_call`` for
``__gpu$xla.gpu.triton`` (the Triton custom call has no serialization-compatibility
guarantee); the Mosaic TPU custom call is exportable as is. Export proves the
kernel lowers (to Triton IR / Mosaic MLIR); the final Triton->PTX and Mosaic->TPU
compilation happens on the device and is not exercised on a CPU-only machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import export as jax_export

from ..mode import target_platform
from ..tiling import pairwise_sum

FLAVOURS = ("tpu", "triton")
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def default_flavour() -> str:
    """``triton`` when tracing for cuda/rocm, else ``tpu`` (:func:`tml.kernels.mode.target_platform`,
    so ``compile_target("cuda")`` on a CPU host picks Triton)."""
    return "triton" if target_platform() in ("cuda", "rocm") else "tpu"


def default_interpret() -> bool:
    """Interpret when tracing for CPU (no accelerator to compile for)."""
    return target_platform() == "cpu"


def resolve(flavour: str | None, interpret: bool | None) -> tuple[str, bool]:
    flavour = default_flavour() if flavour is None else flavour
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown Pallas flavour {flavour!r}; expected one of {FLAVOURS}")
    return flavour, default_interpret() if interpret is None else bool(interpret)


def compiler_params(flavour: str, dimension_semantics: tuple[str, ...] | None = None) -> Any:
    if flavour == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    from jax.experimental.pallas import tpu as pltpu

    if dimension_semantics is None:
        return pltpu.CompilerParams()
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def row_sum(x: jax.Array, flavour: str, interpret: bool) -> jax.Array:
    """Pairwise-tree sum over the last axis, keepdims: [..., n] -> [..., 1]."""
    if flavour == "triton":
        return pairwise_sum(x, -1, keepdims=True, spelling="reshape", barrier=interpret)
    return pairwise_sum(x, -1, keepdims=True, spelling="slices")


def export_disabled_checks(platform: str) -> list:
    """The safety checks ``jax.export`` must skip for ``platform``: the Triton custom call."""
    if platform in ("cuda", "rocm"):
        return [jax_export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    return []


def export_for(fn: Callable[..., Any], platform: str, *args: Any) -> jax_export.Exported:
    """``jax.export`` ``jax.jit(fn)`` for ``platform`` ("cuda", "rocm" or "tpu")."""
    disabled = export_disabled_checks(platform)
    return jax_export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args)
