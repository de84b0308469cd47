"""The mode switch: global default, scoped override, and — the point — every jitted
program follows a switch (the mode is a ``jax.make_user_context`` value, part of the
jit cache key). Each bit test shows the two modes differ on its inputs, so "returns the
other mode's bits" is a real check."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tests.stream.random_turns import random_turns
from tml import kernels
from tml.kernels import (
    get_default_mode,
    get_mode,
    kernel_mode,
    matmul,
    mode_aware_jit,
    set_default_impl,
    set_default_mode,
)
from tml.kernels.mode import get_default_impl, kernel_impl, resolve_impl
from tml.kernels.testing import assert_bits_equal, bits_equal

MODES = ("batch_invariant", "standard")


def test_default_is_batch_invariant():
    assert get_default_mode() == "batch_invariant"
    assert get_mode() == "batch_invariant"


def test_scoped_override_nests_and_restores():
    with kernel_mode("standard"):
        assert get_mode() == "standard"
        with kernel_mode("batch_invariant"):
            assert get_mode() == "batch_invariant"
        assert get_mode() == "standard"
    assert get_mode() == "batch_invariant"


def test_global_default_and_override_precedence():
    set_default_mode("standard")
    assert get_mode() == "standard"
    with kernel_mode("batch_invariant"):
        assert get_mode() == "batch_invariant"
    assert get_mode() == "standard"


def test_unknown_mode_rejected():
    with pytest.raises(ValueError):
        set_default_mode("fast")
    with pytest.raises(ValueError), kernel_mode("nope"):
        pass
    with pytest.raises(ValueError):
        matmul(jnp.ones((2, 2)), jnp.ones((2, 2)), mode="nope")
    with pytest.raises(ValueError):
        set_default_impl("fast")
    assert get_default_mode() == "batch_invariant" and get_default_impl() == "auto"


def test_auto_impl_is_reference_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_impl(None) == "reference"
    assert resolve_impl("pallas") == "pallas"
    with kernel_impl("pallas"):
        assert resolve_impl(None) == "pallas"
    set_default_impl("reference")
    assert resolve_impl(None) == "reference"


def test_every_jit_retraces_when_the_mode_or_impl_switches():
    traces = []

    @jax.jit
    def f(x):
        traces.append((get_mode(), resolve_impl(None)))
        return x + 1

    f(jnp.ones(3))
    f(jnp.ones(3))
    with kernel_mode("standard"):
        f(jnp.ones(3))
    f(jnp.ones(3))  # back to batch_invariant: the first trace, from the cache
    set_default_mode("standard")
    f(jnp.ones(3))  # the same effective mode as the override: cached too
    set_default_mode("batch_invariant")
    with kernel_impl("pallas"):
        f(jnp.ones(3))
    set_default_impl("pallas")
    f(jnp.ones(3))
    assert traces == [("batch_invariant", "reference"), ("standard", "reference"), ("batch_invariant", "pallas")]


def test_mode_aware_jit_is_jax_jit():
    g = mode_aware_jit(lambda x, n: x * n, static_argnames="n")
    assert float(g(jnp.ones(()), n=3)) == 3.0


# ---------------------------------------------------------------------------
# the same jitted entry point returns the other mode's bits after a switch
# ---------------------------------------------------------------------------


def kernel_pair(x, w, q, k, v, mode=None):
    """A "few rows" GEMM and a grouped-query attention: both differ between the modes."""
    return matmul(x, w, mode=mode), kernels.attention(q, k, v, mode=mode)


@pytest.fixture(scope="module")
def pair_inputs():
    rng = np.random.default_rng(0)
    shapes = ((8, 256), (256, 256), (2, 24, 4, 16), (2, 24, 2, 16), (2, 24, 2, 16))
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


@pytest.fixture(scope="module")
def pair_refs(pair_inputs):
    """Per mode: the pair jitted with the mode passed explicitly (independent of the
    switch), after checking its matmul against the un-jitted op."""
    refs = {}
    for m in MODES:
        refs[m] = jax.jit(functools.partial(kernel_pair, mode=m))(*pair_inputs)
        assert_bits_equal(refs[m][0], matmul(*pair_inputs[:2], mode=m), f"{m} matmul, jitted vs eager")
    for a, b in zip(refs["batch_invariant"], refs["standard"]):
        assert not bits_equal(a, b)  # the two modes differ on these inputs
    return refs


def assert_pair(out, ref, what):
    for name, a, b in zip(("matmul", "attention"), out, ref):
        assert_bits_equal(a, b, f"{what}: {name}")


def test_plain_jit_follows_kernel_mode(pair_inputs, pair_refs):
    f = jax.jit(kernel_pair)
    assert_pair(f(*pair_inputs), pair_refs["batch_invariant"], "default")
    with kernel_mode("standard"):
        assert_pair(f(*pair_inputs), pair_refs["standard"], "with kernel_mode('standard')")
    assert_pair(f(*pair_inputs), pair_refs["batch_invariant"], "after the with block")


def test_plain_jit_follows_set_default_mode(pair_inputs, pair_refs):
    f = jax.jit(kernel_pair)
    assert_pair(f(*pair_inputs), pair_refs["batch_invariant"], "default")
    set_default_mode("standard")
    assert_pair(f(*pair_inputs), pair_refs["standard"], "set_default_mode('standard')")
    set_default_mode("batch_invariant")
    assert_pair(f(*pair_inputs), pair_refs["batch_invariant"], "set_default_mode('batch_invariant')")


def test_export_and_shard_map_follow_kernel_mode(pair_inputs, pair_refs):
    from jax import export

    mesh = jax.make_mesh((1,), ("x",))
    g = jax.jit(jax.shard_map(kernel_pair, mesh=mesh, in_specs=jax.P(), out_specs=jax.P(), check_vma=False))
    for m in MODES:
        with kernel_mode(m):
            assert_pair(export.export(jax.jit(kernel_pair))(*pair_inputs).call(*pair_inputs), pair_refs[m],
                        f"jax.export under {m}")
            assert_pair(g(*pair_inputs), pair_refs[m], f"shard_map under {m}")


# ---------------------------------------------------------------------------
# a model: nnx.jit forward and the trainer's jitted step
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """(model config, model, packed batch): 1 layer, 1 MoE, rows of 128 tokens."""
    from tml.model.config import ModelConfig
    from tml.model.model import InteractionModel
    from tml.stream import layout, pack

    cfg = ModelConfig(name="mode-test", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                      n_experts=4, top_k=2, d_expert=64, n_dense_layers=1, vision_layers=1)
    rng = np.random.default_rng(0)
    rows = pack([layout(random_turns(rng, 2)) for _ in range(3)], 128, 8, align=64)
    batch = {k: jnp.asarray(v) for k, v in rows.as_dict().items()}
    return cfg, InteractionModel(cfg, rngs=nnx.Rngs(0)), batch


def test_nnx_jit_model_follows_kernel_mode(tiny):
    _, model, batch = tiny
    refs = {}
    for m in MODES:  # a fresh entry point per mode: traced once, under that mode
        with kernel_mode(m):
            refs[m] = nnx.jit(lambda m_, b: m_(b).text_logits)(model, batch)
    assert not bits_equal(refs["batch_invariant"], refs["standard"])
    fwd = nnx.jit(lambda m_, b: m_(b).text_logits)
    assert_bits_equal(fwd(model, batch), refs["batch_invariant"], "nnx.jit, default")
    with kernel_mode("standard"):
        assert_bits_equal(fwd(model, batch), refs["standard"], "nnx.jit, with kernel_mode('standard')")
    set_default_mode("standard")
    assert_bits_equal(fwd(model, batch), refs["standard"], "nnx.jit, set_default_mode('standard')")
    set_default_mode("batch_invariant")
    assert_bits_equal(fwd(model, batch), refs["batch_invariant"], "nnx.jit, back to batch_invariant")


def test_train_step_jit_follows_kernel_mode(tiny):
    from tml.model.loss import LossWeights
    from tml.train.state import TrainState
    from tml.train.step import make_train_step

    cfg, model, batch = tiny
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(1e-2)

    def make():
        return make_train_step(graphdef, tx, LossWeights(), cfg.balance_rate).jit()

    def run(step):
        # the update donates its inputs: give every call its own copies
        p, r = jax.tree.map(jnp.copy, (params, rest))
        out = step(TrainState.create(p, r, tx.init(p), jax.random.key(0)), batch)
        return jax.tree.leaves(out.state.params), out.metrics["grad_norm"]

    refs = {}
    for m in MODES:  # a fresh jitted step per mode: traced once, under that mode
        with kernel_mode(m):
            refs[m] = run(make())
    assert not all(bits_equal(a, b) for a, b in zip(refs["batch_invariant"][0], refs["standard"][0]))
    step = make()
    for m, switch in (("batch_invariant", None), ("standard", "with"), ("standard", "global"),
                      ("batch_invariant", "global")):
        if switch == "with":
            with kernel_mode(m):
                got = run(step)
        else:
            if switch == "global":
                set_default_mode(m)
            got = run(step)
        assert_bits_equal(got[1], refs[m][1], f"TrainStep.jit grad_norm, {m} ({switch})")
        for a, b in zip(got[0], refs[m][0]):
            assert_bits_equal(a, b, f"TrainStep.jit params, {m} ({switch})")
