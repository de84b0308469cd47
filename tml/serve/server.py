"""The ``tml serve`` server: websocket sessions over one streaming :class:`~tml.sampler.Engine`.

One websocket is one session (:mod:`tml.serve.protocol`); every session lives in the
same engine, so a tick serves all of them as one batch. An asyncio task ticks every
``tick_ms`` (200 ms): it takes the oldest queued 200 ms chunk of every session that has
one (with the typed text, the micro-turn's video frame pair and background results that
arrived before it) and hands the appends and ``engine.tick()`` to the engine thread;
then, off the engine, each session's outputs are vocoded (when the engine was built with
``vocoder=False``, as ``tml serve`` builds it), encoded and sent: MODEL_AUDIO (PCM16),
MODEL_TEXT, MODEL_EVENT (control actions) and TICK (timing, tokens, raw log-prob bits).
When an output holds ``<delegate>``, the model's text since its last delegation goes to
an asynchronous background task (:mod:`tml.serve.delegation`) whose result becomes the
``background`` input of a later micro-turn; no tick waits for it. A tick whose engine
step ends past its deadline starts the next at once and is counted in ``/stats``
(``deadline_misses``).

**Threads.** The engine is not thread-safe (``append`` mutates the session a running
``tick`` reads; ``open``/``close``/``rollback`` move pages), so exactly one thread — the
server's *engine thread*, a one-worker executor named ``tml-serve-engine`` — makes every
engine call (open, append, tick, rollback, close, the pool's counters), and an
``asyncio.Lock`` keeps a tick's appends and its ``tick()`` together. The event loop
never runs engine work: while a tick runs, it goes on receiving messages, checking
tokens and rate limits and answering malformed frames, PINGs and refused handshakes at
once (``tests/serve/test_threads.py``); opening, closing and rolling back a session wait
for the running tick. The vocoder (Griffin–Lim, ``vocoder=``) runs in a second thread
(``tml-serve-vocoder``, one hop per tick for every session that spoke) and frames are
encoded and sent by a task, both outside the engine lock, so tick *n*'s publishing
overlaps tick *n + 1*'s engine step; at most one earlier tick is still being published
when a tick starts, and a session's frames always go out in micro-turn order. JPEG/PNG
decoding runs in a worker thread too.

**Video.** The model sees video at 10 fps: a micro-turn's input is a *frame pair*
(:class:`tml.sampler.TurnInputs`), so up to two VIDEO frames join the next AUDIO chunk
that arrives (bound to it when it arrives, so a backlog never shifts them; one frame
alone is duplicated; a third before that chunk is refused, ``video_rate``; a chunk
refused for ``backlog`` drops its frames too).
Frames are resized to ``video_size``² RGB (80 → 4 patches of 40×40×2).

**Safety.** Binds ``127.0.0.1`` unless told otherwise. Optional token (``?token=`` on
the websocket URL or ``"token"`` in the handshake, compared in constant time). Limits:
sessions (``max_sessions``; the engine's own), message size (``max_message_bytes``;
aiohttp's hard limit is 4x that and closes the socket), message rate (a token bucket of
``messages_per_second``, burst 2 s worth) and queued chunks (``max_queued_chunks``). Any
malformed, oversized or refused message gets an ERROR frame to its sender only and is
dropped: no other session's inputs, outputs or timing change (``tests/serve``). A
socket that closes frees its session's pages in the engine's pool as soon as the
running tick (if any) ends. SIGTERM/SIGINT close every socket (code 1001), every
session, and stop the server (:func:`run`).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from tml.serve import protocol as P
from tml.serve.delegation import MAX_REQUEST_CHARS, Delegate, Router, run_delegate
from tml.serve.protocol import Kind, ProtocolError

log = logging.getLogger(__name__)
MAX_FRAMES_PER_TURN = 2          # the micro-turn's frame pair (10 fps video)


@dataclass
class Limits:
    """What one client may do; see the module docstring."""

    max_sessions: int = 8
    max_message_bytes: int = P.MAX_VIDEO_BYTES + 1
    messages_per_second: float = 50.0
    max_queued_chunks: int = 5


@dataclass(eq=False)
class Conn:
    """One websocket and its session's not-yet-served input (hashed by identity)."""

    ws: web.WebSocketResponse
    sid: int | None = None
    queue: deque = field(default_factory=deque)           # (float32 [3200], arrival perf_counter, its frames)
    typed: list = field(default_factory=list)
    video: list = field(default_factory=list)             # uint8 [S, S, 3] frames for the next AUDIO chunk (<= 2)
    background: list = field(default_factory=list)
    tokens: float = 0.0
    refill: float = 0.0
    micro_turn: int = 0
    handshaken: bool = False
    model_text: str = ""                                  # since the last <delegate>: the next request
    tasks: set = field(default_factory=set)               # running delegations
    generation: int = 0                                   # bumped by close/rollback: late results dropped

    def drop_input(self) -> None:
        """Forget queued, not yet served input and running delegations."""
        self.queue.clear(), self.typed.clear(), self.background.clear(), self.video.clear()
        for t in self.tasks:
            t.cancel()
        self.generation += 1


@dataclass
class Stats:
    """Server counters, served as JSON at ``/stats``."""

    sessions_opened: int = 0
    sessions_closed: int = 0
    chunks_received: int = 0
    ticks: int = 0
    turns_served: int = 0
    frames_sent: int = 0
    audio_frames_sent: int = 0
    errors_sent: int = 0
    error_codes: dict = field(default_factory=dict)                          # code -> errors sent with it
    delegations: int = 0
    video_frames_received: int = 0
    video_turns_served: int = 0                                              # micro-turns served with a frame pair
    publish_errors: int = 0
    deadline_misses: int = 0
    tick_ms: deque = field(default_factory=lambda: deque(maxlen=1000))      # engine tick wall time
    loop_ms: deque = field(default_factory=lambda: deque(maxlen=1000))      # whole server tick (append..last sent)
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=1000))   # chunk arrival -> outputs sent

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not isinstance(v, deque)}
        for k in ("tick_ms", "loop_ms", "latency_ms"):
            v = np.asarray(getattr(self, k), np.float64)
            d[k] = {"n": int(v.size), "p50": float(np.percentile(v, 50)) if v.size else None,
                    "p99": float(np.percentile(v, 99)) if v.size else None}
        return d


def static_file(name: str) -> bytes:
    """A file of the browser page (package data ``tml/serve/static``)."""
    return resources.files("tml.serve").joinpath("static", name).read_bytes()


STATIC_TYPES = {"index.html": "text/html", "client.js": "text/javascript", "capture-worklet.js": "text/javascript"}


def decode_image(data: bytes, size: int) -> np.ndarray:
    """JPEG/PNG bytes → uint8 [size, size, 3] RGB (resized; 40-pixel patches, so
    ``size`` = 80 gives 4 patches per frame pair). Raises ProtocolError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB").resize((size, size)), np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ProtocolError("bad_payload", f"VIDEO frame does not decode as JPEG/PNG: {e}") from None


class Server:
    """``Server(engine, host=, port=, token=, limits=, tick_ms=, seed=, video_size=, delegate=,
    delegate_timeout_s=)``;
    ``await start()`` → the URL, ``await stop()``; or :func:`run` (blocking, SIGTERM-aware).

    ``engine``: a :class:`tml.sampler.Engine` that nobody else uses while the server runs
    (only the server's engine thread calls it, see the module docstring); build it with
    ``vocoder=False`` so the server vocodes off the engine thread (an engine that vocodes
    itself works too: its waveform is sent as it is). ``vocoder``: speech frames uint8
    [T, 80] → float32 [T * 800] samples at 16 kHz (default
    :func:`tml.audio.waveform_from_dmel`, what the engine's own vocoder calls). ``seed``:
    the base seed of sessions whose handshake names none (session id added).
    ``delegate``: what serves ``<delegate>`` requests (:mod:`tml.serve.delegation`;
    default a :class:`Router` of clock and calculator; None turns delegation off)."""

    def __init__(self, engine, *, host: str = "127.0.0.1", port: int = 8998, token: str = "",
                 limits: Limits | None = None, tick_ms: float = 200.0, seed: int = 0, video_size: int = 80,
                 delegate: Delegate | None | str = "default", delegate_timeout_s: float = 30.0, vocoder=None):
        if tick_ms <= 0:
            raise ValueError(f"tick_ms={tick_ms}: the tick period must be positive (200 ms is one micro-turn)")
        if vocoder is None:
            from tml.audio import waveform_from_dmel as vocoder
        self.engine, self.host, self.port, self.token, self.vocoder = engine, host, port, token, vocoder
        limits = limits or Limits()
        self.limits = Limits(**{**limits.__dict__, "max_sessions": min(limits.max_sessions, engine.max_sessions)})
        self.tick_s, self.seed, self.video_size = tick_ms / 1000.0, seed, video_size
        self.delegate = Router() if delegate == "default" else delegate
        self.delegate_timeout_s = delegate_timeout_s
        self.stats = Stats()
        self.conns: set[Conn] = set()
        self._lock = asyncio.Lock()                       # a tick's appends + tick() stay together
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="tml-serve-engine")
        self._vocoder_thread = ThreadPoolExecutor(1, thread_name_prefix="tml-serve-vocoder")
        self._publishing: deque[asyncio.Task] = deque()  # ticks whose outputs are still being vocoded/sent
        self._tick_task: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        self.app = web.Application()
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/static/{name}", self._static)
        self.app.router.add_get("/ws", self._websocket)
        self.app.router.add_get("/stats", self._stats)

    # ------------------------------------------------------------------ http
    async def _index(self, request):
        return web.Response(body=static_file("index.html"), content_type="text/html")

    async def _static(self, request):
        name = request.match_info["name"]
        if name not in STATIC_TYPES:
            raise web.HTTPNotFound()
        return web.Response(body=static_file(name), content_type=STATIC_TYPES[name])

    async def _stats(self, request):
        free = await self.engine_call(lambda: self.engine.pool.n_free)
        return web.json_response({**self.stats.as_dict(), "live_sessions": sum(c.sid is not None for c in self.conns),
                                  "free_pages": free, "connections": len(self.conns)})

    async def engine_call(self, fn, *args):
        """``await engine_call(fn, *args)`` → ``fn(*args)`` run in the engine thread, the only
        thread that touches the engine (also for callers that inspect it while serving)."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    # --------------------------------------------------------------- lifecycle
    async def start(self, tick: bool = True) -> str:
        """Listen → the page's URL; ``tick=False`` starts no tick loop (a caller drives
        :meth:`tick_once`, as the tests do to choose which chunks share a tick)."""
        silent = np.zeros((4, 80), np.uint8)    # the vocoder's first call builds its tables (~0.7 s here): not in a tick
        await asyncio.get_running_loop().run_in_executor(self._vocoder_thread, self.vocoder, silent)
        self._runner = web.AppRunner(self.app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # the real port when port=0
        self.url = f"http://{self.host}:{port}/"
        if tick:
            self._tick_task = asyncio.create_task(self._tick_loop())
        return self.url

    async def stop(self) -> None:
        """Stop ticking, close every socket (1001 going away) and session, stop listening."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
        await self._drain_publishing()
        for c in list(self.conns):
            await c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        async with self._lock:
            for c in list(self.conns):
                await self._close_session(c)
        if self._runner is not None:
            await self._runner.cleanup()
        self._engine_thread.shutdown(wait=True)
        self._vocoder_thread.shutdown(wait=True)

    async def _drain_publishing(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` ticks are still being published."""
        while self._publishing and (self._publishing[0].done() or len(self._publishing) > keep):
            await asyncio.wait([self._publishing.popleft()])

    # ------------------------------------------------------------------ sending
    async def _send(self, c: Conn, frame: bytes) -> None:
        if c.ws.closed:
            return
        try:
            await c.ws.send_bytes(frame)
            self.stats.frames_sent += 1
        except (ConnectionError, RuntimeError):
            pass  # the socket went away; its handler closes the session

    async def _error(self, c: Conn, code: str, message: str) -> None:
        self.stats.errors_sent += 1
        self.stats.error_codes[code] = self.stats.error_codes.get(code, 0) + 1
        await self._send(c, P.error(code, message))

    # ----------------------------------------------------------------- sessions
    async def _open_session(self, c: Conn, seed: int | None, context: str, sampling=None) -> int:
        """Under the lock."""
        live = sum(x.sid is not None for x in self.conns)
        if live >= self.limits.max_sessions:
            raise ProtocolError("server_full", f"the server serves max_sessions={self.limits.max_sessions} sessions: "
                                               "try again later, or start it with a larger serve.max_sessions")
        seed = self.seed + self.stats.sessions_opened if seed is None else seed
        sid = await self.engine_call(lambda: self.engine.open(seed=seed, context=context or None, sampling=sampling))
        c.sid, c.micro_turn = sid, 0
        self.stats.sessions_opened += 1
        return sid

    async def _close_session(self, c: Conn) -> None:
        """Under the lock: the session's pages go back to the pool now."""
        if c.sid is not None:
            sid, c.sid = c.sid, None
            await self.engine_call(self.engine.close, sid)
            self.stats.sessions_closed += 1
        c.sid = None
        c.model_text = ""
        c.drop_input()

    def _sampling(self, hs: dict):
        if "temperature" not in hs and "top_p" not in hs:
            return None
        from dataclasses import replace
        try:
            return replace(self.engine.sampling, **{k: float(hs[k]) for k in ("temperature", "top_p") if k in hs}
                           ).validate()
        except ValueError as e:
            raise ProtocolError("bad_payload", f"handshake sampling: {e}") from None

    # ------------------------------------------------------------------ socket
    async def _websocket(self, request):
        ws = web.WebSocketResponse(max_msg_size=4 * self.limits.max_message_bytes, heartbeat=None)
        await ws.prepare(request)
        c = Conn(ws, tokens=2 * self.limits.messages_per_second, refill=time.perf_counter())
        self.conns.add(c)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self._on_message(c, msg.data, request)
                elif msg.type == WSMsgType.TEXT:
                    await self._error(c, "binary_only", "frames are binary websocket messages (kind byte + payload); "
                                                        "see tml.serve.protocol")
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.conns.discard(c)
            async with self._lock:
                await self._close_session(c)
        return ws

    def _rate_ok(self, c: Conn) -> bool:
        now = time.perf_counter()
        rate = self.limits.messages_per_second
        c.tokens = min(2 * rate, c.tokens + (now - c.refill) * rate)
        c.refill = now
        if c.tokens < 1:
            return False
        c.tokens -= 1
        return True

    async def _on_message(self, c: Conn, data: bytes, request) -> None:
        if not self._rate_ok(c):
            await self._error(c, "rate_limited", f"more than {self.limits.messages_per_second:g} messages/s: "
                                                 "message dropped; send one 200 ms chunk per 200 ms")
            return
        try:
            f = P.decode(data, sender="client", max_bytes=self.limits.max_message_bytes)
            await self._handle(c, f, request)
        except ProtocolError as e:
            await self._error(c, e.code, str(e))
            if e.code in ("unauthorized", "server_full"):
                await c.ws.close(code=4401 if e.code == "unauthorized" else 4503, message=e.code.encode())

    async def _handle(self, c: Conn, f: P.Frame, request) -> None:
        if f.kind == Kind.PING:
            await self._send(c, P.encode(Kind.PONG, f.value))
            return
        if f.kind == Kind.HANDSHAKE:
            if c.handshaken:
                raise ProtocolError("bad_payload", "handshake already done: send CONTROL open after close instead")
            token = f.value.get("token") or request.query.get("token", "")
            if self.token and not hmac.compare_digest(token.encode(), self.token.encode()):
                raise ProtocolError("unauthorized", "wrong or missing token: pass ?token=... or \"token\" in the "
                                                    "handshake (the one `tml serve serve.token=...` was started with)")
            sampling = self._sampling(f.value)
            async with self._lock:
                sid = await self._open_session(c, f.value.get("seed"), f.value.get("context", ""), sampling)
            c.handshaken = True
            await self._send(c, P.encode(Kind.SERVER_HANDSHAKE, {
                "version": P.VERSION, "session": sid, "sample_rate": P.SAMPLE_RATE, "chunk_samples": P.CHUNK_SAMPLES,
                "tick_ms": self.tick_s * 1000, "limits": self.limits.__dict__}))
            return
        if c.sid is None and not (c.handshaken and f.kind == Kind.CONTROL and f.value["action"] == "open"):
            raise ProtocolError("no_session", f"{f.kind.name} before a session is open: send HANDSHAKE first "
                                              "(or CONTROL open after close)")
        if f.kind == Kind.AUDIO:
            if len(c.queue) >= self.limits.max_queued_chunks:
                c.video.clear()                                  # the refused micro-turn's frame pair goes too
                raise ProtocolError("backlog", f"{len(c.queue)} chunks already wait for a tick "
                                               f"(max_queued_chunks={self.limits.max_queued_chunks}): chunk dropped; "
                                               "send in real time, one chunk per 200 ms")
            c.queue.append((f.value, time.perf_counter(), list(c.video)))   # its frame pair rides with it
            c.video.clear()
            self.stats.chunks_received += 1
        elif f.kind == Kind.TEXT:
            c.typed.append(f.value)
        elif f.kind == Kind.VIDEO:
            if len(c.video) >= MAX_FRAMES_PER_TURN:
                raise ProtocolError("video_rate", f"{len(c.video)} VIDEO frames already wait for the next AUDIO chunk: "
                                                  f"a micro-turn takes a frame pair ({MAX_FRAMES_PER_TURN} frames, "
                                                  "10 fps); frame dropped")
            frame = await asyncio.to_thread(decode_image, f.value, self.video_size)
            if c.sid is not None:
                c.video.append(frame)
                self.stats.video_frames_received += 1
        elif f.kind == Kind.CONTROL:
            await self._control(c, f.value)

    async def _control(self, c: Conn, msg: dict) -> None:
        action = msg["action"]
        if action == "open" and c.sid is not None:
            raise ProtocolError("bad_payload", "CONTROL open: a session is already open on this socket; close it first")
        if action == "rollback" and not 0 <= msg["micro_turn"] <= c.micro_turn + 1:   # +1: a tick may be running
            raise ProtocolError("bad_payload", f"CONTROL rollback: micro_turn {msg['micro_turn']} is not a served "
                                               f"micro-turn (0..{c.micro_turn}): roll back to one already served")
        async with self._lock:
            if action == "open":
                if c.sid is not None:
                    raise ProtocolError("bad_payload", "CONTROL open: a session is already open on this socket; "
                                                       "close it first")
                await self._open_session(c, msg.get("seed"), msg.get("context", "") or "")
                event = {"event": "opened", "session": c.sid}
            elif action == "close":
                sid = c.sid
                await self._close_session(c)
                event = {"event": "closed", "session": sid}
            elif action == "cancel":
                dropped = len(c.queue)
                c.drop_input()
                event = {"event": "cancelled", "dropped_chunks": dropped}
            else:  # rollback
                c.drop_input()
                c.model_text = ""
                try:
                    await self.engine_call(self.engine.rollback, c.sid, msg["micro_turn"])
                except ValueError as e:
                    raise ProtocolError("bad_payload", f"CONTROL rollback: {e}") from None
                c.micro_turn = msg["micro_turn"]
                event = {"event": "rolled_back", "micro_turn": msg["micro_turn"]}
        await self._drain_publishing()       # the reply after every output of the ticks before it
        await self._send(c, P.encode(Kind.MODEL_EVENT, {"micro_turn": c.micro_turn, **event}))

    # -------------------------------------------------------------------- ticks
    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.tick_s
        while True:
            await self.tick_once(wait=False)
            now = loop.time()
            if now > deadline:
                self.stats.deadline_misses += 1     # this tick's engine step ended past its slot; the next starts now
                deadline = now + self.tick_s
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(deadline - now)
                deadline += self.tick_s

    async def tick_once(self, wait: bool = True) -> int:
        """Serve every session with a queued chunk → how many were served.

        The appends and ``engine.tick()`` run in the engine thread under the lock; the
        outputs are then vocoded, encoded and sent by a task outside it. ``wait=False``
        (the tick loop) returns after the engine step, so the next tick's engine step may
        overlap this one's publishing; ``wait=True`` (tests) returns after every frame
        of this tick is sent."""
        from tml.sampler import TurnInputs

        await self._drain_publishing(keep=1)          # at most one earlier tick still publishing
        t_start = time.perf_counter()
        async with self._lock:
            work = []                                 # (conn, session id, inputs, video frames, arrival)
            for c in list(self.conns):
                if c.sid is None or not c.queue:
                    continue
                audio, arrived, frames = c.queue.popleft()
                video = None if not frames else frames[0] if len(frames) == 1 else np.stack(frames)   # [2, S, S, 3]
                inputs = TurnInputs(audio=audio, typed="".join(c.typed), video=video,
                                    background="\n".join(c.background))
                c.typed.clear(), c.background.clear()
                work.append((c, c.sid, inputs, len(frames), arrived))
            if not work:
                return 0
            t0 = time.perf_counter()
            try:
                outs, refused, engine_ms = await self.engine_call(self._engine_step,
                                                                 [(sid, inp) for _, sid, inp, _, _ in work])
            except Exception as e:  # noqa: BLE001 -- an engine failure ends the sessions it was serving
                for c, *_ in work:
                    await self._error(c, "engine", f"the engine failed serving this tick ({e!r}); session closed: "
                                                   "send CONTROL open to start again")
                    await self._close_session(c)
                return 0
            served = []
            for c, sid, _, n_frames, arrived in work:
                if sid in refused:                    # capacity, pool exhausted, bad input: this session only
                    await self._error(c, "refused", f"micro-turn not served: {refused[sid]}")
                elif sid in outs:
                    c.micro_turn = outs[sid].micro_turn + 1
                    served.append((c, c.generation, outs[sid], n_frames, t0 - arrived, arrived))
        if not served:
            return 0
        self.stats.ticks += 1
        self.stats.tick_ms.append(engine_ms)
        self.stats.turns_served += len(served)
        self.stats.video_turns_served += sum(s[3] > 0 for s in served)
        prev = self._publishing[-1] if self._publishing else None
        task = asyncio.create_task(self._publish(served, self.stats.ticks, engine_ms, t_start, prev))
        self._publishing.append(task)
        if wait:
            await asyncio.wait([task])
        return len(served)

    def _engine_step(self, work: list) -> tuple[dict, dict, float]:
        """Engine thread: append each (session id, TurnInputs), then one ``tick()`` →
        (outputs by session id, refused {session id: reason}, the tick's wall ms)."""
        refused = {}
        for sid, inputs in work:
            try:
                self.engine.append(sid, inputs)
            except (ValueError, RuntimeError) as e:
                refused[sid] = str(e)
        if len(refused) == len(work):
            return {}, refused, 0.0
        t = time.perf_counter()
        outs = self.engine.tick()
        return outs, refused, 1000 * (time.perf_counter() - t)

    def _vocode(self, speech: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Vocoder thread: each uint8 [4, 80] speech → (float32 [3200] waveform, its ms)."""
        out = []
        for frames in speech:
            t = time.perf_counter()
            out.append((self.vocoder(frames), 1000 * (time.perf_counter() - t)))
        return out

    @staticmethod
    def _frames(o, wave, vocoder_ms: float, tick: int, engine_ms: float, batch: int, n_frames: int,
                queue_ms: float) -> list[bytes]:
        """One session's frames of one micro-turn, TICK last."""
        out = []
        if wave is not None and len(wave):
            out.append(P.encode(Kind.MODEL_AUDIO, wave, micro_turn=o.micro_turn))
        if o.text:
            out.append(P.encode(Kind.MODEL_TEXT, o.text, micro_turn=o.micro_turn))
        if o.control:
            out.append(P.encode(Kind.MODEL_EVENT, {"micro_turn": o.micro_turn, "event": "control",
                                                   "actions": list(o.control)}))
        out.append(P.encode(Kind.TICK, {
            "micro_turn": o.micro_turn, "tick": tick, "queue_ms": round(queue_ms, 3),
            "engine_ms": round(engine_ms, 3), "vocoder_ms": round(vocoder_ms, 3), "batch": batch,
            "tokens": o.tokens.tolist(), "logprobs": P.logprob_hex(o.logprobs), "forced_end": bool(o.forced_end),
            "speaking": bool(len(o.speech)), "video": n_frames}))
        return out

    async def _publish(self, served: list, tick: int, engine_ms: float, t_start: float, prev) -> None:
        """Vocode (one hop to the vocoder thread for every session that spoke and was not
        vocoded by the engine), encode and send one tick's outputs; they wait for the
        previous tick's publishing (``prev``), so every session's frames stay in order."""
        try:
            speaking = [i for i, s in enumerate(served) if s[2].waveform is None and len(s[2].speech)]
            waves: dict[int, tuple] = {}
            if speaking:
                vocoded = await asyncio.get_running_loop().run_in_executor(
                    self._vocoder_thread, self._vocode, [served[i][2].speech for i in speaking])
                waves = dict(zip(speaking, vocoded))
            if prev is not None:
                await asyncio.wait([prev])
            for i, (c, generation, o, n_frames, queue_s, arrived) in enumerate(served):
                wave, vocoder_ms = waves.get(i, (o.waveform, 0.0))
                frames = self._frames(o, wave, vocoder_ms, tick, engine_ms, len(served), n_frames, 1000 * queue_s)
                for frame in frames[:-1]:
                    await self._send(c, frame)
                    self.stats.audio_frames_sent += frame[0] == Kind.MODEL_AUDIO
                if c.generation == generation and c.sid is not None:   # not closed / rolled back meanwhile
                    c.model_text = (c.model_text + o.text)[-MAX_REQUEST_CHARS:]
                    if "<delegate>" in o.control and self.delegate is not None:
                        request, c.model_text = c.model_text.strip(), ""
                        await self._start_delegation(c, request, o.micro_turn)
                await self._send(c, frames[-1])
                self.stats.latency_ms.append(1000 * (time.perf_counter() - arrived))
        except Exception:  # a failed publish must not end the tick loop
            self.stats.publish_errors += 1
            log.exception("tml serve: publishing tick %d failed", tick)
        self.stats.loop_ms.append(1000 * (time.perf_counter() - t_start))

    async def _start_delegation(self, c: Conn, request: str, micro_turn: int) -> None:
        """Start the background task; its result joins the session's next chunk as
        ``background`` (laid out after ``<bg>``). No tick waits for it."""
        await self._send(c, P.encode(Kind.MODEL_EVENT, {"micro_turn": micro_turn, "event": "delegated",
                                                        "request": request}))
        task = asyncio.create_task(self._delegation(c, c.generation, request, micro_turn))
        c.tasks.add(task)
        task.add_done_callback(c.tasks.discard)

    async def _delegation(self, c: Conn, generation: int, request: str, micro_turn: int) -> None:
        result = await run_delegate(self.delegate, request, self.delegate_timeout_s)
        if c.generation != generation or c.sid is None:
            return  # closed, rolled back or cancelled meanwhile
        c.background.append(result)
        self.stats.delegations += 1
        await self._send(c, P.encode(Kind.MODEL_EVENT, {"micro_turn": micro_turn, "event": "background",
                                                        "request": request, "result": result}))


def run(server: Server, *, on_ready=print) -> None:
    """Start ``server``, call ``on_ready(message)`` with its URL, serve until SIGTERM or
    SIGINT, then stop cleanly (every socket and session closed)."""

    async def main():
        url = await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        on_ready(f"tml serve: open {url} (websocket {url}ws, protocol v{P.VERSION})")
        await stop.wait()
        await server.stop()
        on_ready(f"tml serve: stopped after {server.stats.ticks} ticks, {server.stats.sessions_opened} sessions")

    asyncio.run(main())
