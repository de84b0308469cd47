"""Tick latency of the engine on the tiny test model (run: python -m tests.sampler.measure_tick)."""
import time
import numpy as np
from tests.model.tiny_model import tiny_model
from tests.sampler.scenario import ENGINE, inputs_for
from tml import kernels
from tml.sampler import Engine

m = tiny_model()
for mode in ("batch_invariant", "standard"):
    with kernels.kernel_mode(mode):
        for n in (1, 4, 8):
            eng = Engine(m, **{**ENGINE, "max_prefill_chunk": 32, "chunk_buckets": (32,), "max_context": 1024})
            sids = [eng.open(seed=s) for s in range(n)]
            feeds = [inputs_for(300 + s, 25) for s in range(n)]
            times = []
            for t in range(25):
                for sid, f in zip(sids, feeds):
                    eng.append(sid, f[t])
                t0 = time.perf_counter()
                eng.tick()
                times.append(time.perf_counter() - t0)
            w = np.array(times[5:]) * 1e3
            print(f"{mode:16s} sessions={n}  tick p50 {np.percentile(w, 50):6.1f} ms  p99 {np.percentile(w, 99):6.1f} ms")
