"""One tiny engine for all of tests/serve (compiled once: batch bucket 4, prefill chunks
of 16, decode), vocoder off as ``tml serve`` builds it: the server vocodes the speech
frames itself (MODEL_AUDIO frames are real Griffin–Lim audio)."""

import pytest

from tests.model.tiny_model import tiny_model
from tml.sampler import Engine, SamplingParams

ENGINE = {"max_sessions": 4, "batch_buckets": (4,), "chunk_buckets": (16,), "patch_buckets": (4,),
          "max_output_tokens": 8, "max_context": 1024, "sampling": SamplingParams(temperature=1.0, top_p=0.95),
          "vocoder": False}


@pytest.fixture(scope="session")
def engine():
    return Engine(tiny_model(), **ENGINE)
