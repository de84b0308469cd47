"""``tml serve``: the model (the ``make run`` checkpoint or fresh weights), one engine, the server.

:func:`build_engine` sizes the engine from :class:`tml.config.ServeConfig`;
:func:`main` loads the weights through :func:`tml.eval.checkpoint.load_model` (the
``model`` item of a :class:`tml.train.checkpoint.Checkpointer` run dir, refused with the
fix named if it was written by another model config; ``serve.checkpoint=none`` = fresh
weights from ``serve.seed``), compiles every batch bucket (``serve.warmup``: the first
tick of 2, 4, 8 sessions would otherwise stall the tick loop for seconds), prints the
URL and serves until SIGTERM. ``<delegate>`` requests go to ``serve.delegate_url``
(POST) if set, else to the local tools (clock, calculator, ``serve.lookup_file``).
"""

from __future__ import annotations


def build_engine(model, c):
    """An :class:`~tml.sampler.Engine` for ``model`` sized by ``c`` (a ServeConfig), with its
    vocoder off: the server vocodes each tick's speech in its own thread, outside the engine's
    (:mod:`tml.serve.server`), so the next tick's engine step does not wait for Griffin–Lim."""
    from tml.sampler import Engine, SamplingParams

    return Engine(model, max_sessions=c.max_sessions, max_context=c.max_context,
                  max_output_tokens=c.max_output_tokens,
                  sampling=SamplingParams(temperature=c.temperature, top_p=c.top_p), vocoder=False)


def warm_up(engine, video_size: int | None = None) -> int:
    """Compile the prefill and decode programs of every batch bucket (two silent
    micro-turns per bucket, sessions closed after; with ``video_size``, a third carrying
    a black frame pair of that size, as the camera's micro-turns do: their patch bucket
    is another program) → programs compiled. Two, because the engine's very first call
    takes the freshly made KV pool, whose arrays differ in signature from the donated
    ones every later call takes: measured on ``tiny``, one silent micro-turn per bucket
    left the steady-state prefill to the first served tick (a 60–77 s compile on this
    machine). Call it before serving: it calls the engine from this thread."""
    import numpy as np

    from tml.sampler import TurnInputs

    videos = [None, None] + ([np.zeros((2, video_size, video_size, 3), np.uint8)] if video_size else [])
    for b in engine.batch_buckets:
        sids = [engine.open(seed=i) for i in range(b)]
        for video in videos:
            for s in sids:
                engine.append(s, TurnInputs(audio=np.zeros(3200, np.float32), video=video))
            engine.tick()
        for s in sids:
            engine.close(s)
    return engine.compiled_programs()


def main(cfg) -> None:
    """``cfg``: the composed :class:`tml.config.TmlConfig` (``cfg.model``, ``cfg.serve``)."""
    from tml import kernels
    from tml.eval.checkpoint import load_model
    from tml.serve.server import Limits, Server, run

    c = cfg.serve
    kernels.set_default_mode(c.kernel_mode)
    model, loaded = load_model(cfg.model, c.checkpoint, c.seed)
    engine = build_engine(model, c)
    print(f"tml serve: model {cfg.model.name}, {loaded.describe()}, kernel mode {c.kernel_mode}", flush=True)
    if c.warmup:
        print(f"tml serve: compiled {warm_up(engine, c.video_size)} programs (batch buckets {engine.batch_buckets}, "
              "with and without a camera frame pair)", flush=True)
    from tml.serve.delegation import Router, http_delegate

    delegate = http_delegate(c.delegate_url) if c.delegate_url else Router(lookup_file=c.lookup_file or None)
    server = Server(engine, host=c.host, port=c.port, token=c.token, tick_ms=c.tick_ms, seed=c.seed,
                    video_size=c.video_size, delegate=delegate, delegate_timeout_s=c.delegate_timeout_s,
                    limits=Limits(max_sessions=c.max_sessions, max_message_bytes=c.max_message_bytes,
                                  messages_per_second=c.messages_per_second, max_queued_chunks=c.max_queued_chunks))
    run(server, on_ready=lambda m: print(m, flush=True))
