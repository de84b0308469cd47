"""Camera frames: up to two VIDEO frames before a chunk are its micro-turn's frame pair
(uint8 [2, S, S, 3], in arrival order) even when chunks queue up, one frame alone is an image the engine duplicates,
a third is refused (``video_rate``) without touching the pair; TICK reports the count and
``/stats`` counts frames and micro-turns served with video."""

import asyncio
import io

import aiohttp
import numpy as np
from PIL import Image

from tests.serve.client import Client, chunks, queued, serving
from tests.serve.scripted_engine import ScriptedEngine
from tml.serve import protocol as P
from tml.serve.protocol import Kind


def image(color: tuple[int, int, int], fmt: str, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def test_frame_pairs_join_their_chunk():
    engine = ScriptedEngine({})

    async def body():
        async with serving(engine, video_size=40) as server, Client(server.url) as c:
            feed = chunks(0, 3)
            await c.send_raw(P.encode(Kind.VIDEO, image((255, 0, 0), "PNG")))
            await c.send_raw(P.encode(Kind.VIDEO, image((0, 0, 255), "JPEG")))
            await c.send_raw(P.encode(Kind.VIDEO, image((0, 255, 0), "PNG")))        # a third: refused
            refused = await c.next(Kind.ERROR)
            await c.audio(feed[0])
            await c.send_raw(P.encode(Kind.VIDEO, image((10, 20, 30), "PNG")))       # one frame
            await c.audio(feed[1])
            await c.audio(feed[2])                                                   # none
            await queued(server, 3)            # all three wait: each keeps the frames sent before it
            ticks = []
            for _ in range(3):
                await server.tick_once()
                ticks.append((await c.until_tick())[-1].value)
            async with aiohttp.ClientSession() as http, http.get(server.url + "stats") as r:
                stats = await r.json()
            return refused, ticks, stats

    refused, ticks, stats = asyncio.run(asyncio.wait_for(body(), 60))
    assert refused["code"] == "video_rate" and "frame pair" in refused["message"]
    assert [t["video"] for t in ticks] == [2, 1, 0]
    pair, single, none = (i.video for i in engine.inputs[0])
    assert pair.shape == (2, 40, 40, 3) and pair.dtype == np.uint8
    assert (pair[0, ..., 0] > 200).all() and (pair[1, ..., 2] > 200).all() and (pair[1, ..., 0] < 50).all()
    assert single.shape == (40, 40, 3) and np.array_equal(single[0, 0], [10, 20, 30]) and none is None
    assert stats["video_frames_received"] == 3 and stats["video_turns_served"] == 2
