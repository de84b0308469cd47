"""The load test's measurement on the shared engine: 2 clients for 1 s give every figure."""

import asyncio

import numpy as np
import pytest

from tml.serve.app import warm_up
from tml.serve.bench import measure


def test_measure_two_clients(engine):
    warm_up(engine)  # compiled first, as the bench does: a compile inside the 1 s run would outlast its receive timeout
    r = asyncio.run(measure(engine, 2, 1.0, tick_ms=200))
    assert r["turns_served"] + r["chunks_refused_backlog"] == 2 * 5 and r["ticks"] >= 1
    assert 0 < r["e2e_ms"]["p50"] <= r["e2e_ms"]["p99"]
    assert r["engine_tick_ms"]["p50"] > 0 and r["server_overhead_ms"]["p99"] >= 0
    assert r["max_rss_mb"] > 0 and r["deadline_misses_per_1000_ticks"] >= 0
    with pytest.raises(ValueError, match="max_sessions"):
        asyncio.run(measure(engine, engine.max_sessions + 1, 1.0))
    with pytest.raises(ValueError, match="shorter than one 200 ms chunk"):
        asyncio.run(measure(engine, 1, 1.0, audio=np.zeros(100, np.float32)))
