"""Row reductions over the last axis: RMSNorm, softmax, log_softmax, logsumexp.

Shapes (any number of leading "row" dims)::

    rms_norm(x [..., D], weight [D] | None) -> [..., D]   (dtype of x)
    softmax(x [..., V]) / log_softmax(x [..., V])  -> [..., V]
    logsumexp(x [..., V])                          -> [...]

All math is in float32 (bf16 inputs are upcast exactly; results are rounded once).

``batch_invariant``: every sum over the last axis is the canonical pairwise tree of
:func:`tml.kernels.tiling.pairwise_sum` (elementwise adds only; XLA:CPU's own
``reduce`` was measured *not* to be batch-invariant). Maxima are exact in any
order. ``exp``/``log`` run on arrays padded to a multiple of ``LANES`` (16) along
their minor axis (see :data:`tml.kernels.tiling.LANES`). The backward passes are
``custom_vjp``s that use the same tree, so input gradients are batch-invariant as
well and ``dweight`` of RMSNorm (a sum over all rows) is summed in the same fixed
tree over the rows. Only the last axis is supported (``axis=-1``).

``standard``: ``jnp.mean``/``jax.nn.softmax``/``jax.nn.log_softmax``/
``jax.nn.logsumexp`` with autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .mode import resolve_impl, resolve_mode
from .pallas.rms_norm_kernel import rms_norm as pallas_rms_norm
from .tiling import lane_padded, pairwise_sum, upcast

# ---------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------


def rms_norm_reference(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """Batch-invariant RMSNorm, pure jnp (the algorithm the Pallas kernel runs)."""
    xf = upcast(x).astype(jnp.float32)
    d = x.shape[-1]
    ss = pairwise_sum(xf * xf, -1, keepdims=True)
    inv = lax.rsqrt(ss / d + eps)
    y = xf * inv
    if weight is not None:
        y = y * upcast(weight).astype(jnp.float32)
    return y.astype(x.dtype)


def _rms_forward(x, weight, eps, impl):
    if impl == "pallas":
        return pallas_rms_norm(x, weight, eps=eps)
    return rms_norm_reference(x, weight, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bi_rms_norm(x, weight, eps, impl):
    return _rms_forward(x, weight, eps, impl)


def _bi_rms_norm_fwd(x, weight, eps, impl):
    return _rms_forward(x, weight, eps, impl), (x, weight)


def _bi_rms_norm_bwd(eps, impl, res, dy):
    x, weight = res
    d = x.shape[-1]
    xf = upcast(x).astype(jnp.float32)
    dyf = dy.astype(jnp.float32)
    inv = lax.rsqrt(pairwise_sum(xf * xf, -1, keepdims=True) / d + eps)
    g = dyf if weight is None else dyf * upcast(weight).astype(jnp.float32)
    proj = pairwise_sum(g * xf, -1, keepdims=True)
    dx = (g * inv - xf * (inv * inv * inv) * (proj / d)).astype(x.dtype)
    if weight is None:
        return dx, None
    rows = (dyf * (xf * inv)).reshape((-1, d))
    dw = pairwise_sum(rows, 0).astype(weight.dtype)
    return dx, dw


_bi_rms_norm.defvjp(_bi_rms_norm_fwd, _bi_rms_norm_bwd)


def rms_norm(
    x: jax.Array,
    weight: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    mode: str | None = None,
    impl: str | None = None,
) -> jax.Array:
    """``x / sqrt(mean(x**2, -1) + eps) * weight``; x [..., D], weight [D] or None."""
    if resolve_mode(mode) == "standard":
        xf = x.astype(jnp.float32)
        y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
        if weight is not None:
            y = y * weight.astype(jnp.float32)
        return y.astype(x.dtype)
    return _bi_rms_norm(x, weight, float(eps), resolve_impl(impl))


# ---------------------------------------------------------------------------
# softmax family
# ---------------------------------------------------------------------------


def _shift(xf: jax.Array) -> jax.Array:
    """Row max used as the shift; finite even for all -inf rows. [..., V] -> [..., 1]."""
    m = jnp.max(xf, axis=-1, keepdims=True)
    return lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))


def _lse_parts(x: jax.Array):
    """x [..., V] -> xf, m [...,1], shifted, e, s [...,1], log_s [...,1] (all float32).

    exp runs over V padded to a multiple of LANES (pad value -inf, exp -> 0), log
    over the rows padded likewise (see :func:`tml.kernels.tiling.lane_padded`).
    """
    xf = upcast(x).astype(jnp.float32)
    m = _shift(xf)
    shifted = xf - m
    e = lane_padded(jnp.exp, shifted, -1, fill=-jnp.inf)
    s = pairwise_sum(e, -1, keepdims=True)
    rows = s.reshape(-1)
    log_s = lane_padded(jnp.log, rows, 0).reshape(s.shape)
    return xf, m, shifted, e, s, log_s


@jax.custom_vjp
def _bi_logsumexp(x):
    _, m, _, _, _, log_s = _lse_parts(x)
    return (m + log_s)[..., 0].astype(x.dtype)


def _bi_logsumexp_fwd(x):
    out = _bi_logsumexp(x)
    return out, (x, out)


def _bi_logsumexp_bwd(res, dy):
    x, out = res
    p = lane_padded(jnp.exp, upcast(x).astype(jnp.float32) - out.astype(jnp.float32)[..., None], -1, fill=-jnp.inf)
    return ((dy.astype(jnp.float32)[..., None]) * p).astype(x.dtype),


_bi_logsumexp.defvjp(_bi_logsumexp_fwd, _bi_logsumexp_bwd)


@jax.custom_vjp
def _bi_log_softmax(x):
    _, _, shifted, _, _, log_s = _lse_parts(x)
    return (shifted - log_s).astype(x.dtype)


def _bi_log_softmax_fwd(x):
    out = _bi_log_softmax(x)
    return out, (out,)


def _bi_log_softmax_bwd(res, dy):
    (out,) = res
    dyf = dy.astype(jnp.float32)
    p = lane_padded(jnp.exp, out.astype(jnp.float32), -1, fill=-jnp.inf)
    return (dyf - p * pairwise_sum(dyf, -1, keepdims=True)).astype(out.dtype),


_bi_log_softmax.defvjp(_bi_log_softmax_fwd, _bi_log_softmax_bwd)


@jax.custom_vjp
def _bi_softmax(x):
    _, _, _, e, s, _ = _lse_parts(x)
    return (e / s).astype(x.dtype)


def _bi_softmax_fwd(x):
    out = _bi_softmax(x)
    return out, (out,)


def _bi_softmax_bwd(res, dy):
    (out,) = res
    y = out.astype(jnp.float32)
    dyf = dy.astype(jnp.float32)
    return (y * (dyf - pairwise_sum(dyf * y, -1, keepdims=True))).astype(out.dtype),


_bi_softmax.defvjp(_bi_softmax_fwd, _bi_softmax_bwd)


def _check_axis(axis: int, x: jax.Array) -> None:
    if axis not in (-1, x.ndim - 1):
        raise ValueError("tml.kernels reductions work over the last axis only (axis=-1)")


def logsumexp(x: jax.Array, axis: int = -1, *, mode: str | None = None) -> jax.Array:
    """log(sum(exp(x), -1)); x [..., V] -> [...]."""
    _check_axis(axis, x)
    if resolve_mode(mode) == "standard":
        return jax.nn.logsumexp(x.astype(jnp.float32), axis=-1).astype(x.dtype)
    return _bi_logsumexp(x)


def log_softmax(x: jax.Array, axis: int = -1, *, mode: str | None = None) -> jax.Array:
    """x - logsumexp(x); x [..., V] -> [..., V]."""
    _check_axis(axis, x)
    if resolve_mode(mode) == "standard":
        return jax.nn.log_softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)
    return _bi_log_softmax(x)


def softmax(x: jax.Array, axis: int = -1, *, mode: str | None = None) -> jax.Array:
    """exp(x) / sum(exp(x)); x [..., V] -> [..., V]."""
    _check_axis(axis, x)
    if resolve_mode(mode) == "standard":
        return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)
    return _bi_softmax(x)
