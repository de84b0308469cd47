"""Background delegation: a scripted engine emits ``<delegate>`` after the request text;
a slow tool answers while the 100 ms tick loop keeps serving; the result comes back as
the ``background`` input of a later micro-turn. The default tools (clock, calculator,
local file lookup) and the HTTP delegate (a loopback endpoint)."""

import asyncio
import datetime as dt
import time

import pytest
from aiohttp import web

from tests.serve.client import Client, chunks, serving
from tests.serve.scripted_engine import ScriptedEngine
from tml.serve.delegation import Router, calculate, http_delegate, run_delegate
from tml.serve.protocol import Kind

NOW = dt.datetime(2026, 12, 1, 20, 0, tzinfo=dt.UTC)


def test_delegation_result_is_a_later_background_input_and_no_tick_waits():
    script = {0: ("calc 6*", ()), 1: ("7", ("<delegate>",)), 3: ("clock", ("<delegate>",))}
    engine = ScriptedEngine(script)

    async def slow_calc(expr):
        await asyncio.sleep(0.6)        # six ticks of 100 ms
        return calculate(expr)

    async def body():
        router = Router(tools={"calc": slow_calc}, now=lambda: NOW)
        async with serving(engine, tick=True, tick_ms=100, delegate=router) as server, Client(server.url) as c:
            sender = c.stream(chunks(0, 14))
            log = []                       # ("tick", mt, arrival) | ("delegated"/"background", value, arrival)
            while sum(e[0] == "background" for e in log) < 2 or sum(e[0] == "tick" for e in log) < 12:
                f = await c.recv(10)
                if f.kind == Kind.TICK:
                    log.append(("tick", f.value["micro_turn"], time.perf_counter()))
                elif f.kind == Kind.MODEL_EVENT and f.value["event"] in ("delegated", "background"):
                    log.append((f.value["event"], f.value, time.perf_counter()))
            await sender
            return log, server.stats

    log, stats = asyncio.run(asyncio.wait_for(body(), 60))
    events = [(k, v["request"], v.get("result")) for k, v, _ in log if k != "tick"]
    assert events == [("delegated", "calc 6*7", None), ("delegated", "clock", None),
                      ("background", "clock", NOW.isoformat()), ("background", "calc 6*7", "42")]
    start = next(t for k, v, t in log if k == "delegated")
    done = next(t for k, v, t in log if k == "background" and v["result"] == "42")
    assert sum(k == "tick" and start < t < done for k, _, t in log) >= 3   # ticks went on meanwhile
    backgrounds = [i.background for i in engine.inputs[0]]
    first = backgrounds.index("42") if "42" in backgrounds else None
    assert first is not None and first >= 3 and "" == backgrounds[2], backgrounds
    assert NOW.isoformat() in backgrounds and stats.delegations == 2
    assert backgrounds.count("42") == 1                                   # delivered once


def test_default_tools():
    assert calculate("(2 + 3) * 4 - 2 ** 3 / 8") == "19.0"
    for bad in ("__import__('os')", "2 ** 1000", "1 / 0", "x + 1"):
        with pytest.raises(ValueError):
            calculate(bad)
    r = Router(now=lambda: NOW)
    assert asyncio.run(r("clock")) == "2026-12-01T20:00:00+00:00"
    assert asyncio.run(run_delegate(r, "weather today", 5)).startswith("error: no tool 'weather'")


def test_lookup_file_and_timeout(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Paris is the capital of France\nBerlin is the capital of Germany\n")
    r = Router(lookup_file=notes)
    assert asyncio.run(r("lookup capital germany")) == "Berlin is the capital of Germany"
    assert "no line" in asyncio.run(r("lookup Rome"))

    async def never(_):
        await asyncio.sleep(10)
    assert asyncio.run(run_delegate(never, "x", 0.05)) == "error: no result within 0.05 s"


def test_http_delegate_on_loopback():
    async def body():
        async def answer(request):
            return web.json_response({"result": (await request.json())["request"].upper()})
        app = web.Application()
        app.router.add_post("/bg", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await http_delegate(f"http://127.0.0.1:{port}/bg")("find it")
        finally:
            await runner.cleanup()
    assert asyncio.run(body()) == "FIND IT"
