"""The server over the shared tiny engine: outputs per micro-turn, control frames, bad
messages isolated to their sender (the other sessions' output bits unchanged), limits,
pages freed on disconnect, the tick loop. Ticks are driven by the test (``tick_once``)
except in the tick-loop test, so which chunks share a tick is fixed."""

import asyncio
import io

import numpy as np
from PIL import Image

from tests.serve.client import Client, Limits, chunks, queued, serving
from tml.serve import protocol as P
from tml.serve.protocol import Kind


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def png(seed: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def served(frames):
    """One micro-turn's frames → comparable raw content: kinds and payload bits; TICK
    without its timing (wall-clock) fields."""
    out = []
    for f in frames:
        if f.kind == Kind.TICK:
            out.append(("TICK", f.value["micro_turn"], tuple(f.value["tokens"]), f.value["logprobs"]))
        elif f.kind == Kind.MODEL_AUDIO:
            out.append(("AUDIO", f.value[0], f.value[1].tobytes()))
        else:
            out.append((f.kind.name, repr(f.value)))
    return out


def test_micro_turn_outputs_and_control_frames(engine):
    async def body():
        async with serving(engine) as server, Client(server.url, seed=11, context="hi") as a:
            assert a.hello["version"] == P.VERSION and a.hello["chunk_samples"] == 3200
            feed = chunks(1, 3)
            turns = []
            for t, x in enumerate(feed):
                if t == 1:
                    await a.send_raw(P.encode(Kind.VIDEO, png(t)))
                    await a.send_raw(P.encode(Kind.TEXT, "hello"))
                await a.audio(x)
                await queued(server, 1)
                assert await server.tick_once() == 1
                turns.append(await a.until_tick())
            ticks = [fr[-1].value for fr in turns]
            assert [t["micro_turn"] for t in ticks] == [0, 1, 2]
            for fr, t in zip(turns, ticks):
                assert len(t["tokens"]) == len(P.logprob_bits(t["logprobs"])) >= 2
                assert t["engine_ms"] > 0 and t["batch"] == 1
                audio = [f for f in fr if f.kind == Kind.MODEL_AUDIO]
                assert len(audio) == int(t["speaking"]) and all(len(f.value[1]) == 3200 for f in audio)
            assert engine.turns(a.hello["session"])[1].typed == "hello"
            assert engine.turns(a.hello["session"])[1].video is not None
            # rollback to micro-turn 1 and re-send the same chunks: the same outputs, bit for bit
            await a.send_raw(P.encode(Kind.CONTROL, {"action": "rollback", "micro_turn": 1}))
            assert (await a.next(Kind.MODEL_EVENT))["event"] == "rolled_back"
            for t in (1, 2):
                if t == 1:
                    await a.send_raw(P.encode(Kind.VIDEO, png(t)))
                    await a.send_raw(P.encode(Kind.TEXT, "hello"))
                await a.audio(feed[t])
                await queued(server, 1)
                await server.tick_once()
                assert served(await a.until_tick()) == served(turns[t])
            # cancel drops queued input; close ends the session; open starts another
            await a.audio(feed[0])
            await queued(server, 1)
            await a.send_raw(P.encode(Kind.CONTROL, {"action": "cancel"}))
            assert (await a.next(Kind.MODEL_EVENT)) == {"micro_turn": 3, "event": "cancelled", "dropped_chunks": 1}
            assert await server.tick_once() == 0
            await a.send_raw(P.encode(Kind.CONTROL, {"action": "close"}))
            assert (await a.next(Kind.MODEL_EVENT))["event"] == "closed"
            await a.audio(feed[0])
            assert (await a.next(Kind.ERROR))["code"] == "no_session"
            await a.send_raw(P.encode(Kind.CONTROL, {"action": "open", "seed": 11}))
            opened = await a.next(Kind.MODEL_EVENT)
            assert opened["event"] == "opened" and opened["session"] != a.hello["session"]
    run(body())


GARBAGE = [
    b"",                                                     # empty
    b"\x42junk",                                             # unknown kind
    bytes([Kind.AUDIO]) + b"\0" * 100,                       # wrong length
    bytes([Kind.MODEL_TEXT]) + b"\0\0\0\0x",                 # a server frame
    bytes([Kind.VIDEO]) + b"\xff\xd8\xff" + b"\0" * 9000,    # oversized (limit 8192)
    bytes([Kind.VIDEO]) + b"\x89PNG\r\n\x1a\n" + b"broken",  # not a decodable image
    bytes([Kind.CONTROL]) + b"{bad json",
    P.encode(Kind.CONTROL, {"action": "rollback", "micro_turn": 99}),
    P.encode(Kind.HANDSHAKE, {"version": 1}),                # a second handshake
    "a text websocket message",
]


def test_bad_messages_never_disturb_other_sessions(engine):
    """Two sessions, three ticks; in one run session B also sends every kind of bad
    message before each chunk. A's frames (text, audio PCM, tokens, raw log-prob bits) and
    B's own outputs are identical in both runs; only B gets ERROR frames."""
    async def session_run(garbage: bool):
        async with serving(engine, limits=Limits(max_message_bytes=8192)) as server, \
                Client(server.url, seed=21) as a, Client(server.url, seed=22) as b:
            fa, fb = chunks(2, 3), chunks(3, 3)
            out_a, out_b, errors = [], [], []
            for t in range(3):
                if garbage:
                    for g in GARBAGE:
                        await (b.ws.send_str(g) if isinstance(g, str) else b.send_raw(g))
                        errors.append((await b.next(Kind.ERROR))["code"])
                await a.audio(fa[t])
                await b.audio(fb[t])
                await queued(server, 2)
                assert await server.tick_once() == 2
                out_a.append(served(await a.until_tick()))
                out_b.append(served(await b.until_tick()))
            assert not [f for f in a.frames if f.kind == Kind.ERROR]
            return out_a, out_b, errors

    clean_a, clean_b, none = run(session_run(False))
    dirty_a, dirty_b, errors = run(session_run(True))
    assert none == []
    assert errors[:len(GARBAGE)] == ["empty", "unknown_kind", "bad_length", "wrong_direction", "oversized",
                                     "bad_payload", "bad_payload", "bad_payload", "bad_payload", "binary_only"]
    assert dirty_a == clean_a and dirty_b == clean_b


def test_limits_token_sessions_rate_backlog(engine):
    async def body():
        async with serving(engine, token="s3cret", limits=Limits(max_sessions=1, messages_per_second=5,
                                                                 max_queued_chunks=2)) as server:
            c = Client(server.url, seed=1)
            c.handshake = None
            async with c:
                await c.send_raw(P.encode(Kind.HANDSHAKE, {"version": 1, "token": "nope"}))
                assert (await c.next(Kind.ERROR))["code"] == "unauthorized"
                msg = await c.ws.receive(timeout=10)
                assert msg.type.name == "CLOSE" and msg.data == 4401
            async with Client(server.url, token="s3cret", seed=1) as a:         # token on the URL
                other = Client(server.url, seed=2)
                other.handshake = None
                async with other:                                               # the one session is taken
                    await other.send_raw(P.encode(Kind.HANDSHAKE, {"version": 1, "token": "s3cret"}))
                    assert (await other.next(Kind.ERROR))["code"] == "server_full"
                    assert (await other.ws.receive(timeout=10)).data == 4503
                feed = chunks(4, 3)
                for x in feed:
                    await a.audio(x)
                assert (await a.next(Kind.ERROR))["code"] == "backlog"         # 2 queued at most
                for _ in range(10):
                    await a.send_raw(P.encode(Kind.PING, b"x"))
                codes = [f.value["code"] for f in a.frames if f.kind == Kind.ERROR]
                while "rate_limited" not in codes:
                    f = await a.recv(10)
                    codes += [f.value["code"]] if f.kind == Kind.ERROR else []
                assert server.stats.chunks_received == 2
    run(body())


def test_disconnect_frees_pages_at_once(engine):
    async def body():
        async with serving(engine) as server:
            free = engine.pool.n_free
            a = Client(server.url, seed=5)
            async with a:
                await a.audio(chunks(5, 1)[0])
                await queued(server, 1)
                await server.tick_once()
                await a.until_tick()
                assert engine.pool.n_free < free
            for _ in range(200):
                if engine.pool.n_free == free:
                    break
                await asyncio.sleep(0.01)
            assert engine.pool.n_free == free and not engine.pool.sessions()
            engine.pool.check()
    run(body())


def test_tick_loop_serves_one_chunk_per_session_per_tick(engine):
    async def body():
        async with serving(engine, tick=True, tick_ms=100) as server, Client(server.url, seed=9) as a:
            for x in chunks(6, 3):
                await a.audio(x)                         # three at once: one per tick, in order
            ticks = [(await a.until_tick())[-1].value for _ in range(3)]
            assert [t["micro_turn"] for t in ticks] == [0, 1, 2]
            assert len({t["tick"] for t in ticks}) == 3
            assert server.stats.turns_served == 3 and server.stats.latency_ms
    run(body())
