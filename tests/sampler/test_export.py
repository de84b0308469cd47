"""GPU/TPU readiness of the sampler's tick without the hardware (issue 11): the programs a
tick runs — the model call at a prefill shape (a 16-token chunk with video patches) and
at the decode shape (one token, no video), both writing the paged pool in place, and the
speech frame's log-prob sum — of ``tiny`` lower with ``jax.export`` for ``cuda`` and
``tpu``, in both kernel modes, with ``impl="pallas"``: in ``batch_invariant`` the matmuls,
RMSNorms and the paged attention (its pages gathered contiguous, then the split-KV kernel)
lower to their Triton / Mosaic custom calls; ``standard`` is plain HLO.

The token choice itself runs on the host (:mod:`tml.sampler.sampling`, numpy): nothing to
export. Lowering only, as tests/train/test_export.py (its ``export_program``).
"""

import functools
import re

import jax
import numpy as np
import pytest

from tests.train.export_programs import custom_calls, export_program, recipe_model
from tml import kernels
from tml.model.model import InteractionModel
from tml.sampler import Engine
from tml.sampler.engine import _advance
from tml.sampler.score import _frame_sum

PLATFORMS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
MODES = ("batch_invariant", "standard")
KERNELS = {"tml_bi_matmul", "tml_bi_rms_norm", "tml_bi_attention"}
SHAPES = {"prefill": (16, 4, True), "decode": (1, 1, False)}  # chunk tokens, patches, video


@pytest.fixture(scope="module")
def engine():
    """A tiny-recipe engine of 2 sessions (fresh weights; only the shapes matter)."""
    from flax import nnx

    model = nnx.eval_shape(lambda: InteractionModel(recipe_model("tiny"), rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nnx.split(model)[1])
    return Engine(model.cfg, params, max_sessions=2, max_context=256, chunk_buckets=(16,),
                  patch_buckets=(4,), vocoder=False)


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.fixture(scope="module")
def exports(engine):
    """{(mode, platform, program): Exported}."""
    out = {}
    for mode in MODES:
        for platform in PLATFORMS:
            with kernels.kernel_mode(mode), kernels.kernel_impl("pallas"):
                for name, (chunk, patches, video) in SHAPES.items():
                    args = _abstract(engine.call_args(2, chunk, patches))
                    fn = functools.partial(_advance, engine.graphdef, video=video)
                    out[mode, platform, name] = export_program(fn, platform, *args)
                out[mode, platform, "frame_sum"] = export_program(_frame_sum, platform,
                                                                  jax.ShapeDtypeStruct((80,), np.float32))
    return out


@pytest.mark.slow  # 12 exports of the tiny model's tick: ~20 s of CPU idle, 2.5 min at load 25
@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("mode", MODES)
def test_tiny_tick_programs_lower(exports, engine, mode, platform):
    for name in SHAPES:
        exp = exports[mode, platform, name]
        assert exp.platforms == (platform,)
        named = set(re.findall(r"tml_bi_\w+", exp.mlir_module()))
        if mode == "batch_invariant":
            assert PLATFORMS[platform] in custom_calls(exp), name
            assert named == KERNELS, f"{name} kernels lowered for {platform}: {named}"
        else:
            assert not custom_calls(exp) and not named, name
        # the pools come back as outputs of the same shapes (written in place when donated)
        pools = [a.shape for a in (*engine.k, *engine.v)]
        assert [a.shape for a in exp.out_avals[2:]] == pools, name
    assert not custom_calls(exports[mode, platform, "frame_sum"])  # a pairwise sum: plain HLO
