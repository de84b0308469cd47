"""An engine stand-in for the server's tests: the calls the server makes (open / append /
tick / rollback / close / pool.n_free), outputs from a script, every input recorded, and
every call's thread and wall interval logged (``calls``) — a call entered while another
runs raises, as the real engine is not thread-safe. The real engine's model would have to
be trained to emit ``<delegate>``; this one is told to."""

from __future__ import annotations

import threading
import time

import numpy as np

from tml.sampler import SamplingParams, TurnOutput


class _Pool:
    def __init__(self, engine):
        self.engine = engine

    @property
    def n_free(self) -> int:
        with self.engine._call("pool.n_free"):
            return 0


class _Call:
    def __init__(self, engine, name):
        self.engine, self.name = engine, name

    def __enter__(self):
        if not self.engine._guard.acquire(blocking=False):
            raise RuntimeError(f"ScriptedEngine.{self.name} entered while another engine call runs")
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.engine.calls.append((self.name, threading.get_ident(), self.t0, time.perf_counter()))
        self.engine._guard.release()


class ScriptedEngine:
    """``script``: {micro-turn: (model text, control actions)}; other micro-turns emit nothing.
    ``tick_seconds``: each tick blocks its thread that long. ``speak``: micro-turns whose
    output holds 4 speech frames (uint8 [4, 80]) and no waveform, as an engine built with
    ``vocoder=False`` returns them (``True``: every micro-turn)."""

    max_sessions = 4
    sampling = SamplingParams()

    def __init__(self, script: dict[int, tuple[str, tuple[str, ...]]], tick_seconds: float = 0.0,
                 speak: set[int] | bool = frozenset()):
        self.script, self.tick_seconds, self.speak = script, tick_seconds, speak
        self.inputs: dict[int, list] = {}
        self.pending: dict[int, object] = {}
        self.calls: list[tuple[str, int, float, float]] = []      # (method, thread ident, start, end)
        self.pool = _Pool(self)
        self._guard = threading.Lock()
        self.ticking = False                                          # a tick() is running now
        self._next = 0

    def _call(self, name: str) -> _Call:
        return _Call(self, name)

    def threads(self) -> set[int]:
        return {t for _, t, _, _ in self.calls}

    def open(self, seed, context=None, sampling=None) -> int:
        with self._call("open"):
            sid, self._next = self._next, self._next + 1
            self.inputs[sid] = []
            return sid

    def append(self, sid, inputs) -> None:
        with self._call("append"):
            self.pending[sid] = inputs

    def tick(self) -> dict[int, TurnOutput]:
        with self._call("tick"):
            self.ticking = True
            time.sleep(self.tick_seconds)
            self.ticking = False
            out = {}
            for sid, inp in self.pending.items():
                mt = len(self.inputs[sid])
                self.inputs[sid].append(inp)
                text, control = self.script.get(mt, ("", ()))
                speaks = self.speak is True or (self.speak is not False and mt in self.speak)
                speech = np.full((4, 80), (mt + 3) % 16, np.uint8) if speaks else np.zeros((0, 80), np.uint8)
                out[sid] = TurnOutput(micro_turn=mt, text=text, text_bytes=text.encode(), speech=speech,
                                      waveform=None if speaks else np.zeros(0, np.float32), control=control,
                                      tokens=np.zeros(1, np.int32), positions=np.zeros(1, np.int32),
                                      logprobs=np.zeros(1, np.float32),
                                      speech_channel_logprobs=np.zeros((len(speech), 80), np.float32),
                                      forced_end=False)
            self.pending = {}
            return out

    def rollback(self, sid, micro_turn) -> None:
        with self._call("rollback"):
            del self.inputs[sid][micro_turn:]

    def close(self, sid) -> None:
        with self._call("close"):
            self.pending.pop(sid, None)  # its inputs stay recorded for the test
