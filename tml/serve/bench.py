"""Load test of ``tml serve``: N concurrent loopback clients streaming in real time.

    python -m tml.serve.bench                      # 1, 4, 16 clients of tiny, 10 s each
    python -m tml.serve.bench --clients 1 4 --seconds 3 --checkpoint none
    python -m tml.serve.bench --audio tests/audio/fixtures/speech_fox_16k.flac

For each N, one server (200 ms tick loop) over one engine (every batch bucket compiled
first) serves N websocket clients on 127.0.0.1, each sending a 200 ms chunk every
200 ms (phases spread over the period) for ``--seconds``. Reported (JSON, also written
to ``bench_results/serve.json``):

* ``deadline_misses_per_1000_ticks`` — ticks that ended past their 200 ms slot;
* ``e2e_ms`` p50/p99 — chunk sent → its micro-turn's outputs received (the TICK frame,
  the last frame of a micro-turn), and ``e2e_audio_ms`` — chunk sent → its MODEL_AUDIO
  (micro-turns where the model spoke);
* ``engine_tick_ms`` p50/p99 — ``engine.tick()`` alone; ``server_overhead_ms`` p50/p99 —
  the server's tick (appends, the tick in the engine thread, vocoding, encoding and
  sending every frame) minus the engine's tick, per tick; ``vocoder_ms`` p50/p99 — one
  session's Griffin–Lim in the server's vocoder thread (micro-turns where the model
  spoke; part of the overhead, but overlapping the next tick's engine step);
* ``chunks_refused_backlog`` — chunks refused because ``max_queued_chunks`` (5) were
  already waiting: the server fell more than a second behind real time;
* ``programs_compiled_during_run`` — should be 0 after the warm-up;
* ``max_rss_mb`` — the process's peak resident memory so far.

The clients share the server's process and event loop (loopback, no other machine), so
their own receive work is inside the measured overhead: an upper bound on the server's.
Bounded: at most 64 clients and 60 s per N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from pathlib import Path

import numpy as np


def _pct(v, q):
    return float(np.percentile(v, q)) if len(v) else None


async def measure(engine, n_clients: int, seconds: float, tick_ms: float = 200.0,
                  audio: np.ndarray | None = None) -> dict:
    """One load run of ``n_clients`` over ``engine`` (every session closed after).
    ``audio``: float32 [n] at 16 kHz every client streams (client ``i`` from chunk ``i``,
    looping); default uniform noise in ±0.2."""
    import aiohttp

    from tml.serve import protocol as P
    from tml.serve.protocol import Kind
    from tml.serve.server import Limits, Server

    if not 1 <= n_clients <= min(64, engine.max_sessions):
        raise ValueError(f"{n_clients} clients: 1..{min(64, engine.max_sessions)} (the engine's max_sessions)")
    seconds = min(seconds, 60.0)
    if audio is None:
        audio = np.random.default_rng(0).uniform(-0.2, 0.2, P.CHUNK_SAMPLES)
    audio = np.asarray(audio, np.float32)[:len(audio) // P.CHUNK_SAMPLES * P.CHUNK_SAMPLES]
    if not len(audio):
        raise ValueError(f"audio shorter than one 200 ms chunk ({P.CHUNK_SAMPLES} samples at 16 kHz)")
    pieces = [P.encode(Kind.AUDIO, a) for a in audio.reshape(-1, P.CHUNK_SAMPLES)]
    server = Server(engine, port=0, tick_ms=tick_ms, limits=Limits(max_sessions=n_clients))
    compiled = engine.compiled_programs()
    url = await server.start()
    n_chunks = max(1, int(seconds * 1000 / tick_ms))
    e2e, e2e_audio, vocoder, dropped = [], [], [], [0]

    async def client(i: int):
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws", max_msg_size=0) as ws:
            await ws.send_bytes(P.encode(Kind.HANDSHAKE, {"version": P.VERSION, "seed": i}))
            assert P.decode((await ws.receive(timeout=30)).data, sender="server").kind == Kind.SERVER_HANDSHAKE
            sent: dict[int, float] = {}

            async def send():
                await asyncio.sleep(i * tick_ms / 1000 / n_clients)
                t0 = time.perf_counter()
                for k in range(n_chunks):
                    await asyncio.sleep(max(0.0, t0 + k * tick_ms / 1000 - time.perf_counter()))
                    sent[k] = time.perf_counter()
                    await ws.send_bytes(pieces[(i + k) % len(pieces)])
            sender = asyncio.create_task(send())
            done = refused = 0
            while done + refused < n_chunks:
                msg = await ws.receive(timeout=60)
                f = P.decode(msg.data, sender="server")
                now = time.perf_counter()
                if f.kind == Kind.MODEL_AUDIO:
                    e2e_audio.append(1000 * (now - sent[f.value[0]]))
                elif f.kind == Kind.TICK:
                    e2e.append(1000 * (now - sent[f.value["micro_turn"]]))
                    if f.value["speaking"]:
                        vocoder.append(f.value["vocoder_ms"])
                    done += 1
                elif f.kind == Kind.ERROR and f.value["code"] == "backlog":
                    refused += 1            # the server fell behind real time: the chunk was refused
                    dropped[0] += 1
                elif f.kind == Kind.ERROR:
                    raise RuntimeError(f"client {i}: {f.value}")
            await sender

    try:
        await asyncio.gather(*(client(i) for i in range(n_clients)))
    finally:
        await server.stop()
    s = server.stats
    ticks = max(s.ticks, 1)
    overhead = np.asarray(s.loop_ms) - np.asarray(s.tick_ms)
    return {"clients": n_clients, "seconds": seconds, "ticks": s.ticks, "turns_served": s.turns_served,
            "chunks_refused_backlog": dropped[0],
            "deadline_misses": s.deadline_misses,
            "deadline_misses_per_1000_ticks": round(1000 * s.deadline_misses / ticks, 1),
            "e2e_ms": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99)},
            "e2e_audio_ms": {"n": len(e2e_audio), "p50": _pct(e2e_audio, 50), "p99": _pct(e2e_audio, 99)},
            "engine_tick_ms": {"p50": _pct(s.tick_ms, 50), "p99": _pct(s.tick_ms, 99)},
            "server_overhead_ms": {"p50": _pct(overhead, 50), "p99": _pct(overhead, 99)},
            "vocoder_ms": {"n": len(vocoder), "p50": _pct(vocoder, 50), "p99": _pct(vocoder, 99)},
            "programs_compiled_during_run": engine.compiled_programs() - compiled,
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--checkpoint", default="runs/tiny", help="run dir / checkpoints dir / step dir, or none")
    ap.add_argument("--audio", help="an audio file every client streams (looped; any format soundfile reads); "
                                    "default uniform noise")
    ap.add_argument("--out", default="bench_results/serve.json")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    import tml.recipes
    from tml.config import ServeConfig
    from tml.eval.checkpoint import load_model
    from tml.model.config import ModelConfig
    from tml.serve.app import build_engine, warm_up

    raw = OmegaConf.load(Path(tml.recipes.__file__).parent / "model" / "tiny.yaml")
    raw.pop("defaults", None)
    tiny = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))   # the `tiny` recipe
    ckpt = args.checkpoint if args.checkpoint == "none" or Path(args.checkpoint).exists() else "none"
    model, loaded = load_model(tiny, ckpt)
    engine = build_engine(model, ServeConfig(max_sessions=max(args.clients)))
    audio = None
    if args.audio:
        from tml.audio import load_audio
        audio = load_audio(args.audio)
    t = time.perf_counter()
    warm_up(engine)
    result = {"model": "tiny", "weights": loaded.describe(), "warm_up_s": round(time.perf_counter() - t, 1),
              "load_average_before": list(os.getloadavg()), "cpus": os.cpu_count(),
              "audio": args.audio or "noise",
              "batch_buckets": list(engine.batch_buckets), "runs": []}
    for n in args.clients:
        r = asyncio.run(measure(engine, n, args.seconds, audio=audio))
        r["load_average_after"] = list(os.getloadavg())
        result["runs"].append(r)
        print(json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
