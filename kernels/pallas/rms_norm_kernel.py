"""Pallas RMSNorm: one program per block of rows, the whole row in the block.

``rms_norm(x [..., D], weight [D] | None) -> [..., D]`` (dtype of x).

Per row: ``ss = pairwise_sum(x*x)`` (the canonical tree, see
:func:`tml.kernels.tiling.pairwise_sum`), ``y = x * rsqrt(ss / D + eps) * weight`` in
float32 — exactly :func:`tml.kernels.reductions.rms_norm_reference`. Rows are padded to
``block_rows``; the Triton flavour pads D to a power of two with zeros (the tree pads
to a power of two anyway, so the additions are the same).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..tiling import next_pow2, pad_axis, round_up
from . import common


def _kernel(*refs, d, eps, has_weight, flavour, interpret):
    if has_weight:
        x_ref, w_ref, o_ref = refs
    else:
        x_ref, o_ref = refs
    x = x_ref[...].astype(jnp.float32)
    ss = common.row_sum(x * x, flavour, interpret)
    inv = lax.rsqrt(ss / d + eps)
    y = x * inv
    if has_weight:
        y = y * w_ref[...].astype(jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def rms_norm(
    x: jax.Array,
    weight: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    flavour: str | None = None,
    interpret: bool | None = None,
    block_rows: int = 16,
) -> jax.Array:
    flavour, interpret = common.resolve(flavour, interpret)
    lead, D = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, D)
    M = x2.shape[0]
    Mp = round_up(max(M, 1), block_rows)
    Dp = next_pow2(D) if flavour == "triton" else D
    xp = pad_axis(pad_axis(x2, 0, Mp), 1, Dp)
    args = [xp]
    in_specs = [pl.BlockSpec((block_rows, Dp), lambda i: (i, 0))]
    if weight is not None:
        args.append(pad_axis(weight.reshape(1, D), 1, Dp))
        in_specs.append(pl.BlockSpec((1, Dp), lambda i: (0, 0)))
    kernel = functools.partial(
        _kernel, d=D, eps=float(eps), has_weight=weight is not None, flavour=flavour, interpret=interpret
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Dp), x.dtype),
        grid=(Mp // block_rows,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_rows, Dp), lambda i: (i, 0)),
        compiler_params=common.compiler_params(flavour, ("parallel",)),
        interpret=interpret,
        name="tml_bi_rms_norm",
    )(*args)
    return out[:M, :D].reshape(lead + (D,))
