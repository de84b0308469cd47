"""MoE expert compute: a token's output does not depend on the other tokens (raw bits),
the gather+GEMV decode path equals the grouped path, accuracy, deterministic grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tml.kernels import chunked_linear, matmul, moe_ffn, route_topk
from tml.kernels.testing import assert_bits_equal, bits_equal

SETTINGS = settings(max_examples=5, deadline=None, derandomize=True)
T_FULL, D, F, E = 48, 64, 128, 8


def _weights(seed=0, d=D, f=F, e=E):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))
    ) + (jnp.asarray(rng.standard_normal((d, e)), jnp.float32),)


WG, WU, WD, ROUTER = _weights()


@functools.partial(jax.jit, static_argnames=("k", "mode", "path"))
def moe_layer(x, k, mode, path="grouped"):
    weights, experts = route_topk(matmul(x, ROUTER, mode=mode), k, mode=mode)
    return moe_ffn(x, experts, weights, WG, WU, WD, mode=mode, path=path)


@functools.partial(jax.jit, static_argnames=("mode", "path"))
def moe_given_routing(x, experts, weights, mode, path="grouped"):
    return moe_ffn(x, experts, weights, WG, WU, WD, mode=mode, path=path)


@SETTINGS
@given(
    n=st.sampled_from([1, 17]),
    seed=st.integers(0, 2**16),
)
def test_token_output_independent_of_other_tokens(n, seed):
    k = 2
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.standard_normal((T_FULL, D)), np.float32)
    full = np.asarray(moe_layer(x, k, "batch_invariant"))
    # a random subset of the tokens, in a random order, batched with fresh other tokens
    idx = rng.choice(T_FULL, size=n, replace=False)
    others = np.asarray(rng.standard_normal((T_FULL - n, D)), np.float32)
    batch = np.concatenate([x[idx], others])
    perm = rng.permutation(T_FULL)
    out = np.asarray(moe_layer(batch[perm], k, "batch_invariant"))
    inv = np.argsort(perm)
    assert_bits_equal(out[inv][:n], full[idx], "tokens re-batched with other tokens")
    sub = np.asarray(moe_layer(x[idx], k, "batch_invariant"))
    assert_bits_equal(sub, full[idx], f"{n} tokens alone")


def test_gemv_decode_path_equals_grouped_path():
    rng = np.random.default_rng(4)
    x = np.asarray(rng.standard_normal((T_FULL, D)), np.float32)
    k = 2
    full = np.asarray(moe_layer(x, k, "batch_invariant", "grouped"))
    for n in (1, 2):
        gemv = moe_layer(x[:n], k, "batch_invariant", "gemv")
        assert_bits_equal(gemv, full[:n], f"gemv path, {n} tokens, top-{k}")
    # a contraction longer than one K chunk (F = 1024 > K_CHUNK = 512) in the down projection
    wg, wu, wd, router = _weights(1, d=64, f=1024, e=4)
    weights, experts = route_topk(jnp.asarray(x) @ router, 2)
    run = jax.jit(lambda x, e, w, path: moe_ffn(x, e, w, wg, wu, wd, path=path), static_argnums=3)
    grouped = run(x, experts, weights, "grouped")
    gemv = run(x[:2], experts[:2], weights[:2], "gemv")
    assert_bits_equal(gemv, grouped[:2], "gemv path with two K chunks")


def _reference_moe(x, experts, weights, wg, wu, wd):
    """The documented algorithm from the public kernels, one expert at a time: each
    expert's rows through the row-invariant ``matmul`` (gate, up), the routing weight on
    the hidden activation, the down projection as ``chunked_linear`` (8 canonical chunks
    of F in the fixed tree, the row-parallel layers' algorithm), the k slots added in
    slot order. x [T, D], experts / weights [T, k] -> [T, D] in x.dtype."""
    T, k = experts.shape
    flat, wflat = np.asarray(experts).reshape(-1), jnp.asarray(weights).reshape(-1).astype(jnp.float32)
    xa = jnp.repeat(jnp.asarray(x), k, axis=0)
    y = jnp.zeros((T * k, x.shape[1]), jnp.float32)
    for e in np.unique(flat):
        rows = np.flatnonzero(flat == e)
        g = matmul(xa[rows], wg[e], mode="batch_invariant", out_dtype=jnp.float32)
        u = matmul(xa[rows], wu[e], mode="batch_invariant", out_dtype=jnp.float32)
        h = jax.nn.silu(g) * u * wflat[rows][:, None]
        y = y.at[rows].set(chunked_linear(h, wd[e].astype(jnp.float32), mode="batch_invariant"))
    y = y.reshape(T, k, -1)
    out = y[:, 0]
    for j in range(1, k):
        out = out + y[:, j]
    return out.astype(x.dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_and_gemv_paths_equal_the_reference_algorithm(dtype):
    """Raw bits of both paths against the algorithm spelled out with the public kernels
    (a guard for any faster implementation of the same arithmetic), float32 and bfloat16;
    the ``standard`` path is a different sum (its down projection is one contraction)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((T_FULL, D)), dtype)
    weights, experts = route_topk(jnp.asarray(x, jnp.float32) @ ROUTER, 2)
    weights = weights.astype(dtype)
    wg, wu, wd = (w.astype(dtype) for w in (WG, WU, WD))
    ref = _reference_moe(x, experts, weights, wg, wu, wd)  # eager: per-expert row sets are data
    run = jax.jit(lambda x, e, w, a, b, c, m, p: moe_ffn(x, e, w, a, b, c, mode=m, path=p), static_argnums=(6, 7))
    assert_bits_equal(run(x, experts, weights, wg, wu, wd, "batch_invariant", "grouped"), ref, f"grouped {dtype}")
    assert_bits_equal(run(x[:2], experts[:2], weights[:2], wg, wu, wd, "batch_invariant", "gemv"), ref[:2],
                      f"gemv {dtype}")
    if dtype == "float32":  # bf16 rounds the last bits away
        assert not bits_equal(run(x, experts, weights, wg, wu, wd, "standard", "grouped"), ref)


def test_standard_mode_breaks_token_invariance():
    rng = np.random.default_rng(2)
    x = np.asarray(rng.standard_normal((T_FULL, D)), np.float32)
    weights, experts = route_topk(jnp.asarray(rng.standard_normal((T_FULL, E)), jnp.float32), 1)
    full = moe_given_routing(x, experts, weights, "standard")
    assert not bits_equal(moe_given_routing(x[:1], experts[:1], weights[:1], "standard"), full[:1])
    full_bi = moe_given_routing(x, experts, weights, "batch_invariant")
    assert_bits_equal(moe_given_routing(x[:1], experts[:1], weights[:1], "batch_invariant"), full_bi[:1])


def test_accuracy_against_dense_reference():
    rng = np.random.default_rng(3)
    x = np.asarray(rng.standard_normal((20, D)), np.float32)
    bias = jnp.asarray(rng.standard_normal(E) * 0.1, jnp.float32)
    logits = jnp.asarray(x) @ ROUTER
    weights, experts = route_topk(logits, 2, correction_bias=bias)
    out = np.asarray(moe_ffn(x, experts, weights, WG, WU, WD))
    std = np.asarray(moe_ffn(x, experts, weights, WG, WU, WD, mode="standard"))
    wg, wu, wd = (np.asarray(a, np.float64) for a in (WG, WU, WD))
    dense = np.zeros((20, D))
    for t in range(20):
        for j in range(2):
            e = int(experts[t, j])
            g, u = x[t] @ wg[e], x[t] @ wu[e]
            dense[t] += float(weights[t, j]) * ((g / (1 + np.exp(-g))) * u) @ wd[e]
    np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, dense, rtol=1e-5, atol=1e-5)
    # routing: the bias moves the selection, not the weights; weights sum to 1
    scores = jax.nn.sigmoid(logits)
    sel = np.argsort(-(np.asarray(scores) + np.asarray(bias)), axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(np.asarray(experts), sel)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_gradients_deterministic():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((T_FULL, D)), jnp.float32)
    weights, experts = route_topk(x @ ROUTER, 2)

    def loss(x, wg, wu, wd, w):
        return jnp.sum(jnp.sin(moe_ffn(x, experts, w, wg, wu, wd)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    g1 = grad(x, WG, WU, WD, weights)
    g2 = grad(x, WG, WU, WD, weights)
    for a, b, name in zip(g1, g2, ("x", "w_gate", "w_up", "w_down", "weights")):
        assert_bits_equal(a, b, f"d{name} run to run")

    def loss_std(x, wg, wu, wd, w):
        return jnp.sum(jnp.sin(moe_ffn(x, experts, w, wg, wu, wd, mode="standard")))

    gs = jax.jit(jax.grad(loss_std, argnums=(0, 1, 2, 3, 4)))(x, WG, WU, WD, weights)
    for a, b in zip(g1, gs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_routing_gradient_matches_autodiff_of_the_standard_router():
    """The batch-invariant router's hand-written backward (sigmoid from its saved output,
    the normalisation's row sum as a fixed tree of rounded products) agrees with plain
    autodiff of the standard router."""
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.standard_normal((T_FULL, E)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((T_FULL, 2)), jnp.float32)

    def loss(lg, mode):
        w, _ = route_topk(lg, 2, score_fn="sigmoid", mode=mode)
        return jnp.sum(jnp.sin(w * c))

    g_bi = jax.jit(jax.grad(lambda lg: loss(lg, "batch_invariant")))(logits)
    g_std = jax.jit(jax.grad(lambda lg: loss(lg, "standard")))(logits)
    np.testing.assert_allclose(np.asarray(g_bi), np.asarray(g_std), rtol=1e-5, atol=1e-6)
    # the gradient of expert weights through the moe: d(weights) is the same row sum
    x = jnp.asarray(rng.standard_normal((T_FULL, D)), jnp.float32)
    weights, experts = route_topk(x @ ROUTER, 2)
    gw = [jax.jit(jax.grad(lambda w, m=m: jnp.sum(jnp.sin(moe_ffn(x, experts, w, WG, WU, WD, mode=m)))))(weights)
          for m in ("batch_invariant", "standard")]
    np.testing.assert_allclose(np.asarray(gw[0]), np.asarray(gw[1]), rtol=1e-4, atol=1e-5)


def test_rounded_is_the_identity_and_keeps_nan():
    from tml.kernels import rounded

    x = jnp.asarray([1.5, -0.0, jnp.inf, jnp.nan, 3e-39], jnp.float32)
    y = jax.jit(rounded)(x)
    assert_bits_equal(y[:3], x[:3], "rounded")
    assert np.isnan(np.asarray(y)[3]) and np.asarray(y)[4] == np.float32(3e-39)


def test_auto_path_is_chosen_per_lowering_platform():
    """path="auto" takes the GEMV decode path only when lowering for XLA:CPU, where its
    bits were measured equal to the grouped path; for cuda / tpu it lowers the grouped
    path (its lax.scan over row tiles is the tell-tale ``while``), even when exported
    from this CPU host."""
    from jax import export
    from tml.kernels.moe import AUTO_PATHS

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, D)), jnp.float32)  # 2 tokens x top-2 = 4 assignments
    run = jax.jit(lambda x: moe_layer(x, 2, "batch_invariant", "auto"))
    assert_bits_equal(run(x), moe_layer(x, 2, "batch_invariant", "gemv"), "auto = gemv on cpu")
    assert AUTO_PATHS["cpu"] == "gemv" and {AUTO_PATHS[p] for p in ("cuda", "rocm", "tpu")} == {"grouped"}
    loops = {p: "stablehlo.while" in export.export(run, platforms=[p])(x).mlir_module() for p in ("cpu", "cuda", "tpu")}
    assert loops == {"cpu": False, "cuda": True, "tpu": True}, loops
    grouped = export.export(jax.jit(lambda x: moe_layer(x, 2, "batch_invariant", "grouped")), platforms=["cpu"])(x)
    assert "stablehlo.while" in grouped.mlir_module()  # the tell-tale is the grouped path's


@pytest.fixture(scope="module")
def tp_results():
    """tests/kernels/moe_tp_check.py in a subprocess with 8 fake CPU devices."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "-m", "tests.kernels.moe_tp_check"], capture_output=True, text=True,
                       env=env, cwd=repo, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tensor_parallel_expert_width_gives_the_one_device_bits(tp_results):
    """``moe_ffn(axis="expert_mlp")`` with F split over 2, 4, 8 devices (one-shot and
    two-shot reductions of the down projection's canonical chunks): the one-device bits,
    grouped and GEMV paths, float32 and bfloat16; ``standard`` (psum) differs in float32."""
    assert tp_results["device_count"] == 8
    cases = tp_results["cases"]
    for name, runs in cases.items():
        if name.endswith("batch_invariant"):
            assert len(runs) == 4 and all(r["bitwise"] for r in runs.values()), (name, runs)
    assert not any(r["bitwise"] for r in cases["float32/grouped/standard"].values())


def _reference_tile_scan(x, experts, weights, wg, wu, wd):
    """The grouped path as first written (before its faster tile): the padded layout of
    ``moe._plan``, a ``lax.scan`` over the 64-row tiles with a ``lax.cond`` skipping the
    unused ones, each tile ``matmul`` (gate, up) -> silu(g) * u * routing weight ->
    ``chunked_linear`` (8 chunk GEMMs in the fixed tree); the k slots in slot order. Its
    gradients are autodiff through that scan: the weight gradients are the per-tile
    products accumulated in the scan's (reverse) tile order. x [T, D] -> [T, D] x.dtype."""
    from jax import lax
    from tml.kernels import moe as moe_mod
    from tml.kernels.tiling import ordered_sum

    T, k = experts.shape
    E, D = wg.shape[0], x.shape[1]
    plan = moe_mod._plan(experts, E, 64)
    xs = moe_mod._dispatch(x, plan["slot_token"], plan["assign_slot"], k).reshape(-1, 64, D)
    wflat = jnp.concatenate([weights.reshape(-1).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])
    ws = wflat[plan["slot_assign"]].reshape(-1, 64, 1)

    def tile(xt, wt, e):
        g = matmul(xt, wg[e], mode="batch_invariant", out_dtype=jnp.float32)
        u = matmul(xt, wu[e], mode="batch_invariant", out_dtype=jnp.float32)
        h = moe_mod._scale_rows(jax.nn.silu(g) * u, wt)
        return chunked_linear(h, wd[e], mode="batch_invariant")

    def body(_, inp):
        i, xt, wt, e = inp
        y = lax.cond(i < plan["used_tiles"], lambda: tile(xt, wt, e), lambda: jnp.zeros((64, D), jnp.float32))
        return None, y

    _, ys = lax.scan(body, None, (jnp.arange(xs.shape[0]), xs, ws, plan["tile_expert"]))
    y = ys.reshape(-1, D)[plan["assign_slot"]].reshape(T, k, D)
    return ordered_sum(y, 1).astype(x.dtype)


@pytest.mark.parametrize("dtype,tokens", [("float32", T_FULL), ("bfloat16", T_FULL), ("float32", 320),
                                          pytest.param("bfloat16", 320, marks=pytest.mark.slow)])
def test_grouped_path_forward_and_gradients_equal_the_tile_scan(dtype, tokens):
    """Raw bits of the grouped path, output and the gradients of x, the three expert
    weights and the routing weights, against the per-tile scan it replaced (the guard
    for its faster tile — the down projection's chunks as one batched GEMM — and its
    written-out backward, which adds the tiles' weight gradients in the scan's
    transpose order); with 320 tokens every token's first expert is expert 0 (a
    correction bias): 5 tiles of one expert next to experts with 1 or 2 tiles;
    ``standard`` gives other gradient bits (float32)."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((tokens, D)), dtype)
    bias = jnp.zeros((E,), jnp.float32).at[0].set(10.0 if tokens > T_FULL else 0.0)
    weights, experts = route_topk(jnp.asarray(x, jnp.float32) @ ROUTER, 2, correction_bias=bias)
    if tokens > T_FULL:
        assert int((experts == 0).sum()) == tokens
    weights = weights.astype(dtype)
    wg, wu, wd = (w.astype(dtype) for w in (WG, WU, WD))

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda x, wg, wu, wd, w: jnp.sum(jnp.sin(fn(x, experts, w, wg, wu, wd)
                                                                                      .astype(jnp.float32))),
                                          argnums=(0, 1, 2, 3, 4)))

    def grouped(mode):
        return lambda *a: moe_ffn(*a, mode=mode, path="grouped")

    args = (x, wg, wu, wd, weights)
    ref_out = jax.jit(_reference_tile_scan)(x, experts, weights, wg, wu, wd)
    assert_bits_equal(jax.jit(grouped("batch_invariant"))(x, experts, weights, wg, wu, wd), ref_out, f"out {dtype}")
    (_, ref), (_, new) = loss(_reference_tile_scan)(*args), loss(grouped("batch_invariant"))(*args)
    for a, b, name in zip(new, ref, ("x", "w_gate", "w_up", "w_down", "weights")):
        assert_bits_equal(a, b, f"d{name} {dtype}")
    if dtype == "float32":
        _, std = loss(grouped("standard"))(*args)
        assert not all(bits_equal(a, b) for a, b in zip(std, ref))
