"""The text loss in position chunks (tml.model.loss.chunked_text_logprobs, make_train_step's
``loss_chunk``): raw bits against the whole-logits loss on the tiny model, one device.

batch_invariant: every row's logits, log-probabilities and input gradient are
row-invariant, so the loss, the metrics and the gradient of every parameter below the
text head keep their bits; the head weight's gradient is summed chunk by chunk (another
association of the same products): close, not bitwise. standard: the chunk's smaller
GEMM rounds differently, and the loss itself changes bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.model.tiny_model import make_batch, tiny_model
from tml import kernels
from tml.model.loss import LossWeights, losses

CHUNK = 32  # 256 positions per row in 8 chunks


def _bits(x):
    x = np.asarray(x)
    return x.view({4: np.uint32, 2: np.uint16, 1: np.uint8, 8: np.uint64}[x.dtype.itemsize])


def _run(mode: str, chunk: int):
    model = tiny_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = make_batch(3)

    def loss_fn(p):
        m = nnx.merge(graphdef, p, rest)
        out = m(batch)
        return losses(out, batch, LossWeights(), text_head_w=m.text_head.w[...] if chunk else None, chunk=chunk)

    with kernels.kernel_mode(mode):
        (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    return loss, metrics, flat


@pytest.fixture(scope="module")
def runs():
    return {(mode, c): _run(mode, c) for mode in ("batch_invariant", "standard") for c in (0, CHUNK)}


def test_chunked_text_loss_keeps_the_bits_in_batch_invariant_mode(runs):
    loss0, m0, g0 = runs["batch_invariant", 0]
    loss1, m1, g1 = runs["batch_invariant", CHUNK]
    assert np.array_equal(_bits(loss0), _bits(loss1))
    for k in m0:
        assert np.array_equal(_bits(m0[k]), _bits(m1[k])), k
    head = [k for k in g0 if "text_head" in k]
    assert len(head) == 1 and len(g0) > 20
    for k in g0:
        if k in head:
            continue
        assert np.array_equal(_bits(g0[k]), _bits(g1[k])), k   # everything below the head
    a, b = np.asarray(g0[head[0]]), np.asarray(g1[head[0]])
    assert not np.array_equal(_bits(a), _bits(b))              # the head weight: reassociated
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_chunked_text_loss_changes_the_bits_in_standard_mode(runs):
    loss0, _, g0 = runs["standard", 0]
    loss1, _, g1 = runs["standard", CHUNK]
    changed = [k for k in g0 if "text_head" not in k and not np.array_equal(_bits(g0[k]), _bits(g1[k]))]
    assert not np.array_equal(_bits(loss0), _bits(loss1)) or changed
    assert abs(float(loss0) - float(loss1)) <= 1e-5 * abs(float(loss0))


def test_chunk_must_divide_the_row():
    from tml.model.loss import chunked_text_logprobs

    with pytest.raises(ValueError, match="does not divide"):
        chunked_text_logprobs(jnp.zeros((1, 10, 4)), jnp.zeros((4, 8)), jnp.zeros((1, 10), jnp.int32), 4)
