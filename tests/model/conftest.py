"""A tiny model and packed batches shared by the model tests (compiled once); the model
and batches themselves are in tiny_model.py, importable by other test packages."""

import pytest
from flax import nnx

from tests.model.tiny_model import tiny_model


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def forward():
    return nnx.jit(lambda m, b: m(b))


@pytest.fixture(scope="session")
def append_chunk():
    """Jitted ``model(chunk, cache=cache, n_new=n)``: the chunk's Outputs, with the new cache."""
    return nnx.jit(lambda m, c, cache, n: m(c, cache=cache, n_new=n))
