"""The server's threads: one engine thread makes every engine call; the event loop stays
responsive during a long tick (malformed frames, PINGs and refused handshakes answered
while the tick runs); the vocoder runs in its own thread, outside the engine lock, and
overlaps the next tick's engine step while every session's frames stay in order."""

import asyncio
import threading
import time

import numpy as np

from tests.serve.client import Client, chunks, queued, serving
from tests.serve.scripted_engine import ScriptedEngine
from tml.serve import protocol as P
from tml.serve.protocol import Kind

MALFORMED = [
    b"\x42junk",                                                 # unknown kind
    bytes([Kind.AUDIO]) + b"\0" * 100,                           # wrong length
    bytes([Kind.CONTROL]) + b"{bad json",
    P.encode(Kind.CONTROL, {"action": "rollback", "micro_turn": 99}),   # not a served micro-turn
    P.encode(Kind.HANDSHAKE, {"version": 1, "token": "t"}),     # a second handshake
]


def test_long_tick_blocks_neither_errors_nor_pings_nor_auth():
    engine = ScriptedEngine({}, tick_seconds=2.0)

    async def body():
        async with serving(engine, token="t") as server, Client(server.url, token="t") as a, \
                Client(server.url, token="t") as b:
            await a.audio(chunks(0, 1)[0])
            await queued(server, 1)
            tick = asyncio.create_task(server.tick_once())
            while not engine.ticking:
                await asyncio.sleep(0.005)
            waits = []
            for m in MALFORMED:
                t = time.perf_counter()
                await b.send_raw(m)
                await b.next(Kind.ERROR)
                waits.append(time.perf_counter() - t)
            t = time.perf_counter()
            await b.send_raw(P.encode(Kind.PING, b"hi"))
            assert await b.next(Kind.PONG) == b"hi"
            waits.append(time.perf_counter() - t)
            intruder = Client(server.url)
            intruder.handshake = None
            async with intruder:
                t = time.perf_counter()
                await intruder.send_raw(P.encode(Kind.HANDSHAKE, {"version": 1, "token": "wrong"}))
                assert (await intruder.next(Kind.ERROR))["code"] == "unauthorized"
                assert (await intruder.ws.receive(timeout=10)).data == 4401
                waits.append(time.perf_counter() - t)
            still_ticking = engine.ticking
            assert await tick == 1
            assert (await a.until_tick())[-1].value["micro_turn"] == 0
            codes = [f.value["code"] for f in b.frames if f.kind == Kind.ERROR]
            return waits, still_ticking, codes

    waits, still_ticking, codes = asyncio.run(asyncio.wait_for(body(), 60))
    assert still_ticking, "the 2 s tick ended before every reply arrived: the replies waited for it"
    assert max(waits) < 1.0, waits
    assert codes == ["unknown_kind", "bad_length", "bad_payload", "bad_payload", "bad_payload"]
    main = threading.get_ident()
    assert len(engine.threads()) == 1 and main not in engine.threads(), engine.calls   # one engine thread


def test_vocoder_runs_off_the_engine_thread_and_overlaps_the_next_tick():
    engine = ScriptedEngine({}, tick_seconds=0.02, speak=True)
    vocoded = []                                            # (thread, start, end)

    def slow_vocoder(frames):
        t = time.perf_counter()
        time.sleep(0.25)
        vocoded.append((threading.get_ident(), t, time.perf_counter()))
        return np.full(len(frames) * 800, frames[0, 0] / 32.0, np.float32)

    async def body():
        async with serving(engine, tick=True, tick_ms=100, vocoder=slow_vocoder) as server, Client(server.url) as c:
            sender = c.stream(chunks(1, 6))
            while sum(f.kind == Kind.TICK for f in c.frames) < 6:
                await c.recv(10)
            await sender
            return c.frames, server.stats

    frames, stats = asyncio.run(asyncio.wait_for(body(), 60))
    order = [(f.kind, f.value[0] if f.kind == Kind.MODEL_AUDIO else f.value["micro_turn"])
             for f in frames if f.kind in (Kind.MODEL_AUDIO, Kind.TICK)]
    assert order == [(k, mt) for mt in range(6) for k in (Kind.MODEL_AUDIO, Kind.TICK)]   # in micro-turn order
    for f in frames:
        if f.kind == Kind.MODEL_AUDIO:                      # the server's vocoder made it: (mt + 3) / 32
            mt, wave = f.value
            assert len(wave) == 3200 and np.allclose(wave, (mt + 3) % 16 / 32.0, atol=1 / 32768)
    ticks = [(t0, t1) for name, _, t0, t1 in engine.calls if name == "tick"]
    assert {t for t, _, _ in vocoded}.isdisjoint(engine.threads())
    overlaps = sum(any(v0 < t1 and t0 < v1 for t0, t1 in ticks) for _, v0, v1 in vocoded)
    assert overlaps >= 2, (ticks, vocoded)                  # a tick's engine step ran while the last one vocoded
    assert len(engine.threads()) == 1 and stats.audio_frames_sent == 6 and stats.publish_errors == 0
