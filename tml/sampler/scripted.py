"""The scripted-session loop: sessions fed one micro-turn per tick through one
:class:`~tml.sampler.Engine`, the way ``tml divergence`` and ``tml rl`` play them.

A session is any object with a ``name`` (str, unique in the call), a ``seed`` (the
engine session's sampling seed) and either

* ``inputs``: a list of :class:`~tml.sampler.TurnInputs`, replayed in order (a fixed
  script: the user does not react), or
* ``user_side()``: a new :class:`UserSide` for this play — a user that **reacts**: the
  input of micro-turn ``t + 1`` is decided from the engine's output of micro-turn ``t``
  (no lookahead: the user hears what the model said in a micro-turn only after it).

At most ``engine.max_sessions`` sessions are live at once; the next joins when one
finishes (its user side returns None).
"""

from __future__ import annotations

from typing import Protocol

from tml.sampler.engine import Engine
from tml.sampler.session import TurnInputs, TurnOutput


class UserSide(Protocol):
    """One session's user: ``first()`` → the inputs of micro-turn 0; ``next(output)`` →
    the inputs of the next micro-turn given the engine's output of the last one, or None
    when the session is over."""

    def first(self) -> TurnInputs: ...

    def next(self, output: TurnOutput) -> TurnInputs | None: ...


class Replay:
    """A fixed script as a :class:`UserSide` (ignores the model's outputs)."""

    def __init__(self, inputs: list[TurnInputs]):
        if not inputs:
            raise ValueError("a scripted session needs at least one micro-turn of inputs")
        self.inputs, self.t = inputs, 0

    def first(self) -> TurnInputs:
        self.t = 0
        return self.inputs[0]

    def next(self, output: TurnOutput) -> TurnInputs | None:
        self.t += 1
        return self.inputs[self.t] if self.t < len(self.inputs) else None


def user_side(session) -> UserSide:
    """The session's reacting user (``session.user_side()``) or a replay of ``session.inputs``."""
    make = getattr(session, "user_side", None)
    return make() if make is not None else Replay(list(session.inputs))


def serve(engine: Engine, sessions: list, on_finish=None
          ) -> tuple[dict[str, list[TurnOutput]], dict[str, list], dict[str, int]]:
    """Feed every session one micro-turn per tick (module docstring) → per session name:
    engine outputs, committed turns, KV length. ``on_finish(name)`` is called as each
    session ends (e.g. a progress bar)."""
    waiting = list(sessions)
    live: dict[int, tuple[object, UserSide]] = {}   # sid -> (session, its user)
    outputs, turns, lengths = {}, {}, {}
    while waiting or live:
        while waiting and len(live) < engine.max_sessions:
            s = waiting.pop(0)
            user = user_side(s)
            sid = engine.open(seed=s.seed)
            engine.append(sid, user.first())
            live[sid] = (s, user)
        served = engine.tick()
        for sid in list(live):
            s, user = live[sid]
            x = user.next(served[sid])
            if x is None:
                outputs[s.name], turns[s.name], lengths[s.name] = engine.outputs(sid), engine.turns(sid), \
                    engine.length(sid)
                engine.close(sid)
                del live[sid]
                if on_finish is not None:
                    on_finish(s.name)
            else:
                engine.append(sid, x)
    return outputs, turns, lengths


__all__ = ["Replay", "UserSide", "serve", "user_side"]
