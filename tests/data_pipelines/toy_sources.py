"""Toy conversation sources for the shard writer: a slice with broken inputs, a crash."""

import numpy as np

from tests.stream.toy_conversation import toy_conversation


def toy_slice(first: int, stop: int, bad_every: int = 0):
    """Conversations first..stop-1; every `bad_every`-th is broken (for reject tests)."""
    from tml.data_pipelines.shards import Reject

    for i in range(first, stop):
        conv = toy_conversation(i)
        if bad_every and i % bad_every == 1:
            conv.user_audio[5] = np.nan
        if bad_every and i % bad_every == 2:
            yield Reject(f"input-{i}.wav", "truncated file")
            continue
        yield conv


def crash_after(first: int, stop: int, crash_at: int):
    for i in range(first, stop):
        if i == crash_at:
            raise KeyboardInterrupt("simulated kill")
        yield toy_conversation(i)
