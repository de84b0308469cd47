"""``model.scan_layers`` and ``model.remat`` change how full rows are computed, not what:
in ``batch_invariant`` the logits, the expert loads and every parameter's gradient have
the raw bits of the unrolled layer loop; in ``standard`` the gradients do not."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from tests.model.tiny_model import CFG, make_batch
from tml import kernels
from tml.model.kv_cache import KVCache
from tml.model.loss import losses
from tml.model.model import InteractionModel

# three stretches: a lone dense block; two MoE blocks, sliding then full (the scan body
# picks the window per layer); two full dense blocks (one window, no choice)
SCANNED = dataclasses.replace(CFG, n_layers=5, layer_types=["sliding", "sliding", "full", "full", "full"],
                              mlp_types=["dense", "moe", "moe", "dense", "dense"])


def _outputs_and_grads(mode: str, **how):
    model = InteractionModel(dataclasses.replace(SCANNED, **how), rngs=nnx.Rngs(0))
    batch = make_batch(3)

    def loss_fn(m):
        out = m(batch)
        return losses(out, batch)[0], (out.text_logits, out.speech_logits, out.expert_load)

    with kernels.kernel_mode(mode):
        grads, outs = nnx.jit(nnx.grad(loss_fn, has_aux=True))(model)
    return [np.asarray(o) for o in outs], [np.asarray(g) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]


def _bitwise(a, b) -> list[bool]:
    return [x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)) for x, y in zip(a, b)]


@pytest.mark.parametrize("mode", ["batch_invariant", "standard"])
def test_scanned_rematerialised_layers_have_the_unrolled_bits(mode):
    outs, grads = _outputs_and_grads(mode)
    s_outs, s_grads = _outputs_and_grads(mode, scan_layers=True, remat=True)
    assert len(grads) == len(s_grads) > 50
    assert outs[2].shape[0] == 2  # two MoE layers' loads, in layer order
    if mode == "batch_invariant":
        assert all(_bitwise(outs, s_outs))
        assert all(_bitwise(grads, s_grads))
    else:  # XLA's own dot and reduction orders differ between the two programs
        assert not all(_bitwise(grads, s_grads))
        for g, s in zip(grads, s_grads):
            np.testing.assert_allclose(s, g, rtol=1e-4, atol=1e-6)


def test_the_sampler_path_is_unchanged(monkeypatch):
    """A chunk appended to a cache runs the unrolled loop whatever the flags say (the
    sampler's programs do not change); only full rows are scanned."""
    model = InteractionModel(dataclasses.replace(SCANNED, scan_layers=True, remat=True), rngs=nnx.Rngs(0))
    calls = []
    original = InteractionModel.rows_through_blocks
    monkeypatch.setattr(InteractionModel, "rows_through_blocks",
                        lambda self, *a: calls.append(1) or original(self, *a))
    batch = make_batch(3)
    chunk = {k: v[:, :8] if k != "patches" else v for k, v in batch.items()}
    cache = KVCache.empty(SCANNED, batch=chunk["tokens"].shape[0], capacity=16)
    jax.eval_shape(lambda: model(chunk, cache=cache))
    assert calls == []
    jax.eval_shape(lambda: model(batch))
    assert calls == [1]
