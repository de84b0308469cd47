"""An engine stand-in for the server's delegation tests: the calls the server makes
(open / append / tick / rollback / close), outputs from a script, every input recorded.
The real engine's model would have to be trained to emit ``<delegate>``; this one is told to."""

from __future__ import annotations

import numpy as np

from tml.sampler import SamplingParams, TurnOutput


class _Pool:
    n_free = 0


class ScriptedEngine:
    """``script``: {micro-turn: (model text, control actions)}; other micro-turns emit nothing."""

    max_sessions = 4
    sampling = SamplingParams()
    pool = _Pool()

    def __init__(self, script: dict[int, tuple[str, tuple[str, ...]]]):
        self.script = script
        self.inputs: dict[int, list] = {}
        self.pending: dict[int, object] = {}
        self._next = 0

    def open(self, seed, context=None, sampling=None) -> int:
        sid, self._next = self._next, self._next + 1
        self.inputs[sid] = []
        return sid

    def append(self, sid, inputs) -> None:
        self.pending[sid] = inputs

    def tick(self) -> dict[int, TurnOutput]:
        out = {}
        for sid, inp in self.pending.items():
            mt = len(self.inputs[sid])
            self.inputs[sid].append(inp)
            text, control = self.script.get(mt, ("", ()))
            out[sid] = TurnOutput(micro_turn=mt, text=text, text_bytes=text.encode(), speech=np.zeros((0, 80), np.uint8),
                                  waveform=np.zeros(0, np.float32), control=control, tokens=np.zeros(1, np.int32),
                                  positions=np.zeros(1, np.int32), logprobs=np.zeros(1, np.float32),
                                  speech_channel_logprobs=np.zeros((0, 80), np.float32), forced_end=False)
        self.pending = {}
        return out

    def rollback(self, sid, micro_turn) -> None:
        del self.inputs[sid][micro_turn:]

    def close(self, sid) -> None:
        self.pending.pop(sid, None)  # its inputs stay recorded for the test
