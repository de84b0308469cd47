"""Policies: what answers a scenario's micro-turns, one micro-turn at a time, as if live.

A :class:`Policy` serves many sessions at once, like the sampler engine: the runner
(:func:`stream`) opens one session per scenario, then every tick hands the policy one
:class:`MicroTurnInput` for each live session and gets one
:class:`~tml.eval.scenarios.MicroTurnOutput` back per session. Sessions join and leave
between ticks (at most ``batch_size`` live at once), and a session never sees an input
before the tick it arrives in.

Policies here:

* :class:`ScriptedOracle` -- replays the scenario's training targets (the model text,
  speech/silence and control tokens ``tml.stream.to_micro_turns`` stores for the
  corpus). It is the upper bound a trained model approaches and must score near
  perfect; it is the only policy that reads ``Sample.script``.
* :class:`AlwaysSilent` -- ``<silence>`` and no text in every micro-turn (the baseline
  every metric must separate from the oracle).
* :class:`ModelPolicy` -- an :class:`~tml.model.InteractionModel` served by the streaming
  sampler (:class:`tml.sampler.Engine`): one engine session per sample, every live
  session's micro-turn appended and all of them served by one ``tick()`` (batched prefill,
  then token-by-token decode together), exactly as a live deployment would run them.

A policy reports a per-session failure (the engine's per-caller errors: bad input, an
exhausted page pool ...) by returning an ``Exception`` instance for that session; the
runner records it against that sample and the other sessions go on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from tml.eval.scenarios import SILENT, MicroTurnOutput


@dataclass(frozen=True)
class MicroTurnInput:
    """One 200 ms micro-turn of input.

    audio: float32 [3200] user audio at 16 kHz; dmel: uint8 [4, 80] its dMel bins (as the
    corpus stores them); video: uint8 [2, H, W, 3] this micro-turn's frame pair (10 fps),
    or None -- raw frames, as the sampler's ``TurnInputs.video`` takes them; typed /
    background: text that arrived during the micro-turn.
    """

    index: int
    audio: np.ndarray
    dmel: np.ndarray
    video: np.ndarray | None = None
    typed: str = ""
    background: str = ""


@dataclass(frozen=True)
class Sample:
    """One scenario to stream: its inputs, its session seed, and its targets (oracle only).

    ``inputs`` is a zero-argument callable producing the micro-turn inputs lazily, so a
    batch of sessions holds only what it streams; ``script`` is the list of target
    :class:`MicroTurnOutput` s, one per micro-turn.
    """

    sample_id: str
    seed: int
    n_micro_turns: int
    inputs: Callable[[], Iterable[MicroTurnInput]]
    script: Sequence[MicroTurnOutput] = ()


@runtime_checkable
class Policy(Protocol):
    """Batched streaming sessions (module docstring)."""

    name: str

    def open(self, sample: Sample) -> None:
        """Start a session for ``sample`` (keyed by ``sample.sample_id``)."""

    def step(self, inputs: Mapping[str, MicroTurnInput]) -> Mapping[str, MicroTurnOutput | Exception]:
        """One tick: one input per live session -> that micro-turn's output per session."""

    def close(self, sample_id: str) -> None:
        """End a session (also after a failure)."""


class AlwaysSilent:
    """``<silence>`` with no text or control token, every micro-turn."""

    name = "silent"

    def open(self, sample: Sample) -> None:
        pass

    def step(self, inputs):
        return {sid: SILENT for sid in inputs}

    def close(self, sample_id: str) -> None:
        pass


class ScriptedOracle:
    """Replays each scenario's targets (``Sample.script``) in time."""

    name = "oracle"

    def __init__(self) -> None:
        self._scripts: dict[str, Sequence[MicroTurnOutput]] = {}

    def open(self, sample: Sample) -> None:
        if len(sample.script) != sample.n_micro_turns:
            raise ValueError(
                f"{sample.sample_id}: the oracle needs one target per micro-turn, got {len(sample.script)} "
                f"for {sample.n_micro_turns}"
            )
        self._scripts[sample.sample_id] = sample.script

    def step(self, inputs):
        return {sid: self._scripts[sid][x.index] for sid, x in inputs.items()}

    def close(self, sample_id: str) -> None:
        self._scripts.pop(sample_id, None)


@dataclass(frozen=True)
class ModelSampling:
    """How :class:`ModelPolicy` samples and what its engine holds (``eval.*`` keys).

    ``temperature`` 0 is greedy (argmax, no random bits: a run is reproducible bit for bit
    and independent of the batch); above 0, each session samples counter-based from its
    sample's seed (``Sample.seed``; :mod:`tml.sampler.sampling`), so a run is still
    reproducible and a sample's tokens do not depend on which sessions it was batched
    with. ``max_output_tokens`` is the per-micro-turn output budget after ``<out>``
    (``<end>`` included): 16 fits 99.5% of the 1,987 target micro-turns of the default
    held-out run (``eval.per_scenario=4``; the longest needs 30); every extra token a
    session emits costs one more batched decode call in its tick. ``inputs``: ``audio`` streams the 3,200 samples of each
    micro-turn through the engine's streaming dMel front end, ``dmel`` hands it the
    corpus' bins (the same bins: ``tests/sampler/test_engine.py``).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_output_tokens: int = 16
    max_context: int = 4096
    inputs: str = "audio"

    def __post_init__(self):
        if self.inputs not in ("audio", "dmel"):
            raise ValueError(f"eval.inputs={self.inputs!r}: choose audio (3,200 samples per micro-turn) or dmel")


class ModelPolicy:
    """A model served by :class:`tml.sampler.Engine`, one session per sample.

    ``step`` appends each live session's :class:`MicroTurnInput` as a
    :class:`tml.sampler.TurnInputs` (audio or dMel, the frame pair, typed and background
    text) and serves them all with one ``tick()``; each :class:`tml.sampler.TurnOutput`
    becomes ``MicroTurnOutput(text_bytes, speaking = 4 speech frames, control)``. An
    ``append`` that raises (bad input, context or pool exhausted: the engine checks all of
    it before queueing) becomes that session's error and the other sessions are served
    as if it had never been appended (the engine's per-caller errors). The engine is built
    with one batch bucket (``max_sessions``), so a tick with fewer live sessions pads
    instead of compiling another program: on this 2-core CPU (shared, load ~10) the first
    tick of a bucket took 18 s and the second 11 s (prefill and decode compiled) against
    0.2 s per tick after that for 8 sessions of the 300-step ``tiny`` model (0.04 s for
    one), so the few draining ticks at the end of a run cost far less padded than
    compiled for buckets 1, 2 and 4.
    ``engine_options`` go to the :class:`~tml.sampler.Engine` (e.g. ``chunk_buckets``).
    """

    def __init__(self, model, *, name: str = "model", max_sessions: int = 8,
                 sampling: ModelSampling = ModelSampling(), **engine_options):
        from tml.sampler import Engine, SamplingParams

        self.name, self.model = name, model
        self.sampling = sampling
        options = dict(batch_buckets=(max_sessions,), max_context=sampling.max_context, vocoder=False,
                       sampling=SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p),
                       max_output_tokens=sampling.max_output_tokens)
        self.engine = Engine(model, max_sessions=max_sessions, **{**options, **engine_options})
        self._sid: dict[str, int] = {}

    def open(self, sample: Sample) -> None:
        if sample.sample_id in self._sid:
            raise ValueError(f"{sample.sample_id}: a session for this sample is already open")
        self._sid[sample.sample_id] = self.engine.open(seed=sample.seed)

    def turn_inputs(self, x: MicroTurnInput):
        """One :class:`MicroTurnInput` -> the engine's :class:`tml.sampler.TurnInputs`."""
        from tml.sampler import TurnInputs

        if self.sampling.inputs == "audio":
            return TurnInputs(audio=x.audio, video=x.video, typed=x.typed, background=x.background)
        return TurnInputs(dmel=x.dmel, video=x.video, typed=x.typed, background=x.background)

    def step(self, inputs):
        out: dict[str, MicroTurnOutput | Exception] = {}
        appended: dict[int, str] = {}
        for sample_id, x in inputs.items():
            try:
                sid = self._sid[sample_id]
                self.engine.append(sid, self.turn_inputs(x))
                appended[sid] = sample_id
            except Exception as e:  # noqa: BLE001 -- the engine's per-caller errors, reported per sample
                out[sample_id] = e
        if appended:
            served = self.engine.tick()
            for sid, sample_id in appended.items():
                o = served[sid]
                out[sample_id] = MicroTurnOutput(o.text_bytes, len(o.speech) > 0, tuple(o.control))
        return out

    def close(self, sample_id: str) -> None:
        sid = self._sid.pop(sample_id, None)
        if sid is not None:
            self.engine.close(sid)


def targets(micro_turns) -> list[MicroTurnOutput]:
    """A conversation's training targets (``tml.stream.MicroTurn`` list) as outputs."""
    return [MicroTurnOutput(m.model_text.encode(), m.model_speech is not None, tuple(m.control)) for m in micro_turns]


@dataclass
class Streamed:
    """The result of streaming one sample: its outputs, or why it failed."""

    sample: Sample
    outputs: list[MicroTurnOutput]
    error: str | None = None


def stream(policy: Policy, samples: Iterable[Sample], batch_size: int = 8) -> Iterator[Streamed]:
    """Stream every sample through ``policy``, at most ``batch_size`` sessions live per tick.

    Yields one :class:`Streamed` per sample as it finishes (or fails: a failure to open,
    an input that cannot be produced, an exception returned for that session, a
    missing or malformed output -- the error names the sample and the micro-turn).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending = iter(samples)
    live: dict[str, tuple[Streamed, Iterator[MicroTurnInput]]] = {}

    def finish(sid: str, error: str | None = None) -> Streamed:
        done, _ = live.pop(sid)
        done.error = error
        try:
            policy.close(sid)
        except Exception as e:  # noqa: BLE001 -- a failing close is reported, not fatal
            done.error = done.error or f"{sid}: close failed: {e}"
        return done

    exhausted = False
    while live or not exhausted:
        while not exhausted and len(live) < batch_size:  # sessions join between ticks
            s = next(pending, None)
            if s is None:
                exhausted = True
                break
            if s.sample_id in live:
                yield Streamed(s, [], f"{s.sample_id}: duplicate sample id in one run")
                continue
            try:
                policy.open(s)
                live[s.sample_id] = (Streamed(s, []), iter(s.inputs()))
            except Exception as e:  # noqa: BLE001 -- reported per sample
                yield Streamed(s, [], f"{s.sample_id}: could not open a session: {e}")
        if not live:
            break
        tick: dict[str, MicroTurnInput] = {}
        failed: list[tuple[str, str]] = []
        for sid, (done, it) in live.items():
            try:
                x = next(it, None)
            except Exception as e:  # noqa: BLE001
                failed.append((sid, f"{sid}: input of micro-turn {len(done.outputs)} failed: {e}"))
                continue
            if x is None:
                continue
            tick[sid] = x
        for sid, msg in failed:
            yield finish(sid, msg)
        ended = [sid for sid in live if sid not in tick]
        for sid in ended:
            n_out, n_want = len(live[sid][0].outputs), live[sid][0].sample.n_micro_turns
            yield finish(sid, None if n_out == n_want else f"{sid}: {n_out} inputs for {n_want} micro-turns")
        if not tick:
            continue
        out = policy.step(tick)
        for sid, x in tick.items():
            o = out.get(sid)
            if isinstance(o, Exception):
                yield finish(sid, f"{sid}: micro-turn {x.index}: {o}")
            elif not isinstance(o, MicroTurnOutput):
                yield finish(sid, f"{sid}: micro-turn {x.index}: the policy returned {type(o).__name__}, "
                                  "not a MicroTurnOutput")
            else:
                live[sid][0].outputs.append(o)
