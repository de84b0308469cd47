"""A protocol-v1 test client (aiohttp websocket) and an in-process server of the shared
tiny engine, for tests/serve."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import numpy as np

from tml.serve import protocol as P
from tml.serve.protocol import Kind
from tml.serve.server import Limits, Server


class Client:
    """``async with Client(url, seed=1) as c``: handshake done, ``c.hello`` the reply."""

    def __init__(self, url: str, token: str | None = None, **handshake):
        self.url = url.rstrip("/") + "/ws" + (f"?token={token}" if token else "")
        self.handshake = {"version": P.VERSION, **handshake}
        self.frames: list[P.Frame] = []

    async def __aenter__(self):
        self._http = aiohttp.ClientSession()
        self.ws = await self._http.ws_connect(self.url, max_msg_size=0)
        if self.handshake is not None:
            await self.send_raw(P.encode(Kind.HANDSHAKE, self.handshake))
            self.hello = await self.next(Kind.SERVER_HANDSHAKE)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self._http.close()

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def audio(self, samples: np.ndarray) -> None:
        await self.send_raw(P.encode(Kind.AUDIO, samples))

    def stream(self, pieces: list[np.ndarray], period: float = 0.1) -> asyncio.Task:
        """Send ``pieces`` as audio chunks, one per ``period`` seconds, in a task (as a live
        microphone would, while the test reads replies); await the task when done."""
        async def feed():
            for x in pieces:
                await self.audio(x)
                await asyncio.sleep(period)
        return asyncio.create_task(feed())

    async def recv(self, timeout: float = 30.0) -> P.Frame:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise ConnectionError(f"websocket {msg.type.name} ({msg.data!r}, {msg.extra!r})")
        f = P.decode(msg.data, sender="server")
        self.frames.append(f)
        return f

    async def next(self, kind: Kind, timeout: float = 30.0):
        """Frames up to the first of ``kind`` → its value."""
        while True:
            f = await self.recv(timeout)
            if f.kind == kind:
                return f.value

    async def until_tick(self, timeout: float = 60.0) -> list[P.Frame]:
        """The frames of one served micro-turn (MODEL_* then its TICK)."""
        start = len(self.frames)
        await self.next(Kind.TICK, timeout)
        return self.frames[start:]


def chunks(seed: int, n: int) -> list[np.ndarray]:
    """n 200 ms chunks of PCM16-exact noise (what a client can send bit for bit)."""
    rng = np.random.default_rng(seed)
    return [P.pcm16_to_float(P.float_to_pcm16(rng.uniform(-0.3, 0.3, P.CHUNK_SAMPLES))) for _ in range(n)]


@contextlib.asynccontextmanager
async def serving(engine, *, tick: bool = False, **kw):
    """A Server on a free 127.0.0.1 port; ``tick=False``: no tick loop (the test calls
    ``server.tick_once()``), so which chunks share a tick is the test's choice."""
    server = Server(engine, port=0, **kw)
    await server.start(tick=tick)
    try:
        yield server
    finally:
        await server.stop()


async def queued(server: Server, n: int, timeout: float = 10.0) -> None:
    """Wait until the server holds ``n`` queued chunks in total."""
    for _ in range(int(timeout / 0.01)):
        if sum(len(c.queue) for c in server.conns) >= n:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"the server never queued {n} chunks")


__all__ = ["Client", "Limits", "chunks", "queued", "serving"]
