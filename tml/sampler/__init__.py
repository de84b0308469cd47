"""tml.sampler: the streaming sampler, bitwise aligned with the trainer.

Many sessions share one paged KV pool; every ``tick()`` prefills the pending 200 ms
micro-turns of all sessions as one batched call and decodes their outputs token by
token, all together, until each session's ``<end>``. In ``batch_invariant`` kernel mode
the log-probability reported for every sampled token equals, bit for bit, the one
:func:`score` (the trainer's full-row scoring) computes for the finished session —
whatever the batch, the prefill chunking, joins and leaves, replays or rollbacks
(``tests/sampler/test_alignment.py``).

    import numpy as np
    from tml.sampler import Engine, SamplingParams, TurnInputs, score

    engine = Engine(model, max_sessions=16, sampling=SamplingParams(temperature=0.8, top_p=0.95))
    sid = engine.open(seed=1234, context="You are a helpful assistant.")
    out = engine.step(sid, TurnInputs(audio=np.zeros(3200, np.float32)))   # append + tick
    out.text, out.speech, out.waveform, out.control, out.logprobs           # one micro-turn
    # many sessions: engine.append(a, ...); engine.append(b, ...); outs = engine.tick()
    engine.rollback(sid, 0)                     # back to before micro-turn 0
    engine.set_params(new_state)                # RL: swap weights, no recompilation
    scored = score(model, [engine.turns(sid)])  # the trainer's log-probs, one row per session
    engine.close(sid)

Modules:

* :mod:`~tml.sampler.pages` — :class:`PagePool`: the fixed pool of KV pages, page tables, the
  no-leak / no-double-ownership invariant;
* :mod:`~tml.sampler.session` — :class:`TurnInputs` (checked before anything is queued),
  the streaming dMel front end, :class:`TurnOutput`, a session's committed history;
* :mod:`~tml.sampler.grammar` — the output grammar (valid UTF-8 text, the per-micro-turn budget);
* :mod:`~tml.sampler.sampling` — greedy / temperature / top-k / top-p / min-p, counter-based;
* :mod:`~tml.sampler.engine` — :class:`Engine`: open / append / tick / step / rollback / close,
  shape buckets, weight swaps;
* :mod:`~tml.sampler.score` — :func:`score` (trainer side) and the one speech-frame sum.
"""

from tml.sampler.engine import Engine, SessionError
from tml.sampler.grammar import OutputGrammar
from tml.sampler.pages import PagePool, PoolExhausted
from tml.sampler.sampling import GREEDY, SamplingParams, choose, uniforms
from tml.sampler.score import ScoredSession, score, speech_frame_logprob
from tml.sampler.session import TurnInputs, TurnOutput, stream_dmel

__all__ = [
    "Engine", "GREEDY", "OutputGrammar", "PagePool", "PoolExhausted", "SamplingParams", "ScoredSession",
    "SessionError", "TurnInputs", "TurnOutput", "choose", "score", "speech_frame_logprob", "stream_dmel",
    "uniforms",
]
