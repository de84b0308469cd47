"""Fixtures for the kernel tests (tml.kernels)."""

import numpy as np
import pytest
from tml.kernels import set_default_impl, set_default_mode


@pytest.fixture(autouse=True)
def _default_kernel_settings():
    """Every kernel test starts from the library defaults (batch_invariant, auto impl)."""
    set_default_mode("batch_invariant")
    set_default_impl("auto")
    yield
    set_default_mode("batch_invariant")
    set_default_impl("auto")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
