"""chunked_dot over long contractions (more than ``UNROLLED_CHUNKS`` whole K chunks, e.g.
the weight gradient ``x.T @ dy`` summed over every row of a batch): the chunks in a loop
give the raw bits of the unrolled chain of chunk GEMMs (the code before the loop), forward,
batched, one-row batched (MoE GEMV) and through the matmul's custom VJP; a reversed
summation order of the same products gives other bits (the comparison sees order)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tml.kernels import matmul
from tml.kernels.testing import assert_bits_equal, bits_equal


def _operands(seed, M, K, N, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dtype)
    return x, w


def _loss(x, w, mode):
    return jnp.sum(jnp.sin(matmul(x, w, mode=mode)))


grad_fn = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnums=2)

# > UNROLLED_CHUNKS whole chunks, without and with a shorter last one
LONG_K = [(17 * 512, "float32"), (18 * 512 + 200, "bfloat16")]


def _unrolled(monkeypatch, fn, *args):
    """``fn(*args)`` traced with every chunk written into the program (the code before the loop)."""
    from tml.kernels import tiled_matmul

    with monkeypatch.context() as m:
        m.setattr(tiled_matmul, "UNROLLED_CHUNKS", 10**9)
        return jax.jit(fn)(*args)


@pytest.mark.parametrize(("k", "dtype"), LONG_K)
def test_looped_chunks_are_the_unrolled_bits(monkeypatch, k, dtype):
    from tml.kernels.tiled_matmul import UNROLLED_CHUNKS, chunked_dot

    assert k // 512 > UNROLLED_CHUNKS
    x, w = _operands(k, 64, k, 64, dtype)
    looped = jax.jit(chunked_dot)(x, w)
    assert_bits_equal(looped, _unrolled(monkeypatch, chunked_dot, x, w), f"2-D, K={k}")
    assert "while" in jax.jit(chunked_dot).lower(x, w).as_text()      # the loop is what ran
    # the comparison sees an order change: the same products summed in reverse order
    assert not bits_equal(looped, jax.jit(chunked_dot)(x[:, ::-1], w[::-1]))
    rng = np.random.default_rng(1)
    xb = jnp.asarray(rng.standard_normal((3, 64, k)), dtype)
    wb = jnp.asarray(rng.standard_normal((3, k, 64)) / np.sqrt(k), dtype)
    batched = functools.partial(chunked_dot, batched=True)
    assert_bits_equal(jax.jit(batched)(xb, wb), _unrolled(monkeypatch, batched, xb, wb), f"batched, K={k}")
    gemv = jax.jit(batched)(xb[:, :1], wb)                               # the MoE one-row path
    assert_bits_equal(gemv, _unrolled(monkeypatch, batched, xb[:, :1], wb), f"one-row batched, K={k}")


def test_weight_gradient_over_many_rows_is_the_unrolled_bits(monkeypatch, rng):
    """dw = x.T @ dy contracts over the rows: 17 chunks for 8,704 + 100 rows."""
    x = jnp.asarray(rng.standard_normal((17 * 512 + 100, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 64)) / 6, jnp.float32)
    dx, dw = grad_fn(x, w, "batch_invariant")
    dx_u, dw_u = _unrolled(monkeypatch, jax.grad(functools.partial(_loss, mode="batch_invariant"),
                                                 argnums=(0, 1)), x, w)
    assert_bits_equal(dw, dw_u, "dw")
    assert_bits_equal(dx, dx_u, "dx")
    assert not bits_equal(dw, grad_fn(x, w, "standard")[1])


def test_large_chunk_products_loop_with_the_batched_gemm_bits(monkeypatch):
    """A 2-D product whose chunk-batched GEMM would hold more than CHUNK_PRODUCTS_BYTES
    (a vocabulary head on a TPU chip) runs the loop, with the same bits."""
    from tml.kernels import tiled_matmul
    from tml.kernels.tiled_matmul import chunked_dot

    x, w = _operands(5, 64, 4 * 512 + 100, 64, "bfloat16")
    batched_gemm = jax.jit(chunked_dot)(x, w)
    assert "while" not in jax.jit(chunked_dot).lower(x, w).as_text()
    with monkeypatch.context() as m:
        m.setattr(tiled_matmul, "CHUNK_PRODUCTS_BYTES", 4 * 64 * 64 * 4 - 1)
        looped = jax.jit(lambda a, b: chunked_dot(a, b))  # a new function: traced under the patch
        assert "while" in looped.lower(x, w).as_text()
        assert_bits_equal(looped(x, w), batched_gemm, "looped for its size")


@pytest.mark.parametrize(("k", "dtype"), [(4800, "float32"), (300, "float32"), (17 * 512 + 100, "bfloat16")])
def test_a_transposed_weight_is_contracted_in_place_with_the_same_bits(k, dtype):
    """``chunked_dot(dy, w, w_transposed=True)`` (w [N, K] as given: the input gradient
    ``dy @ w.T``) has the bits of the chain on a materialised ``w.T`` — the hMLP's real
    contraction (9 chunks + 192), one short chunk, and the loop over > 16 chunks — and
    ``matmul``'s backward uses it without a transpose copy of the weight."""
    from tml.kernels.tiled_matmul import chunked_dot

    dy, wt = _operands(k, 64, k, 96, dtype)  # dy [64, K]; the layer's weight w [N, K] = wt.T
    w = jnp.asarray(wt.T, copy=True)
    in_place = jax.jit(functools.partial(chunked_dot, w_transposed=True))(dy, w)
    assert_bits_equal(in_place, jax.jit(chunked_dot)(dy, jnp.asarray(w.T, copy=True)), f"K={k}")
    assert not bits_equal(in_place, jax.jit(chunked_dot)(dy[:, ::-1], jnp.asarray(w.T[::-1], copy=True)))
    # through matmul's custom VJP: dx of y = x @ w is dy @ w.T, here with w [N=K', ...]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((70, w.shape[0])), dtype)
    dx, _ = grad_fn(x, w, "batch_invariant")
    dy_x = jax.grad(lambda y: jnp.sum(jnp.sin(y)))(matmul(x, w, mode="batch_invariant"))
    expect = chunked_dot(jnp.pad(dy_x, ((0, 58), (0, 0))), jnp.asarray(w.T, copy=True))[:70].astype(dtype)
    assert_bits_equal(dx, expect, f"matmul dx, K={k}")
    hlo = jax.jit(jax.grad(_loss, argnums=0), static_argnums=2).lower(x, w, "batch_invariant").compile().as_text()
    assert not any("transpose(" in line and f"[{w.shape[1]},{w.shape[0]}]" in line for line in hlo.splitlines()), \
        "the backward copied w.T"
