"""GPU/TPU readiness without the hardware: the whole training step (its two programs,
gradients and update, :meth:`tml.train.step.TrainStep.jit`) of ``tiny`` and of ``small``
(with a short 256-token row) lowers with ``jax.export`` for ``cuda`` and ``tpu``, in both
kernel modes, with ``impl="pallas"``: every kernel (matmul, RMSNorm, attention) lowers
to its Triton / Mosaic custom call, the standard mode to plain HLO.

Lowering only: the final Triton -> PTX and Mosaic -> TPU compilation happens on the
device (``tml.kernels.pallas.common``); the pod plan (``tml.parallel.aot``) compiles
for TPU with libtpu.

Hook for the sampler's tick (issue 11, being written): export it here with
``tests.train.export_programs.export_program(tick, platform, *abstract_args)`` in the
same parametrisation (``PLATFORMS`` x ``MODES``).
"""

import re

import pytest
from tests.parallel.parallel_fixtures import make_rows
from tests.train.export_programs import abstract_rows, custom_calls, export_program, recipe_model, train_step_shapes
from tml import kernels

PLATFORMS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
MODES = ("batch_invariant", "standard")
KERNELS = {"tml_bi_matmul", "tml_bi_rms_norm", "tml_bi_attention"}


def _export_all(config_name: str) -> dict:
    """{(mode, platform): (gradients Exported, update Exported)} for one model config."""
    shapes = train_step_shapes(recipe_model(config_name), abstract_rows(make_rows(0, 2)))
    out = {}
    for mode in MODES:
        for platform in PLATFORMS:
            with kernels.kernel_mode(mode), kernels.kernel_impl("pallas"):
                out[mode, platform] = (export_program(shapes.step.gradients, platform, *shapes.gradients_args),
                                       export_program(shapes.step.update, platform, *shapes.update_args))
    return out


@pytest.fixture(scope="module")
def tiny_exports():
    return _export_all("tiny")


def _check(exports, mode, platform):
    grads, update = exports[mode, platform]
    assert grads.platforms == (platform,) and update.platforms == (platform,)
    text = grads.mlir_module()
    named = set(re.findall(r"tml_bi_\w+", text))
    if mode == "batch_invariant":
        assert PLATFORMS[platform] in custom_calls(grads)
        assert named == KERNELS, f"kernels lowered for {platform}: {named}"
    else:
        assert not custom_calls(grads) and not named  # plain XLA: nothing to lower by hand
    assert not custom_calls(update)  # AdamW and the balance bias: elementwise HLO


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("mode", MODES)
def test_tiny_training_step_lowers(tiny_exports, mode, platform):
    _check(tiny_exports, mode, platform)


@pytest.mark.slow
def test_small_training_step_lowers():
    exports = _export_all("small")  # about 30 s
    for mode in MODES:
        for platform in PLATFORMS:
            _check(exports, mode, platform)


def test_compile_target_decides_the_pallas_flavour_and_auto_impl():
    from tml.kernels.mode import resolve_impl, target_platform
    from tml.kernels.pallas import common

    assert target_platform() == "cpu" and resolve_impl("auto") == "reference"
    assert (common.default_flavour(), common.default_interpret()) == ("tpu", True)
    with kernels.compile_target("cuda"):
        assert resolve_impl("auto") == "pallas"
        assert (common.default_flavour(), common.default_interpret()) == ("triton", False)
    with kernels.compile_target("tpu"):
        assert (common.default_flavour(), common.default_interpret()) == ("tpu", False)
    with pytest.raises(ValueError, match="compile target"):
        with kernels.compile_target("gpu0"):
            pass
