"""tml.serve: talk to a checkpoint in real time — websocket streaming sessions over the
sampler engine (``tml serve``).

* :mod:`~tml.serve.protocol` — the versioned wire protocol (byte-tagged binary frames),
  :func:`~tml.serve.protocol.encode` / :func:`~tml.serve.protocol.decode`, :class:`ProtocolError`;
* :mod:`~tml.serve.server` — :class:`Server` (aiohttp: the page, ``/ws``, ``/stats``, the
  200 ms tick loop over one engine called from one engine thread, the vocoder in its own
  thread, limits), :func:`run` (SIGTERM-aware);
* :mod:`~tml.serve.delegation` — ``<delegate>`` requests served in the background (clock,
  calculator, local file lookup, any callable or HTTP endpoint), results as ``<bg>`` input;
* :mod:`~tml.serve.app` — ``tml serve``: the model (checkpoint or fresh), the engine, the server;
* ``static/`` — the browser page (microphone via an AudioWorklet, optional camera at 10 fps
  with a preview, playback, transcript, timeline).
"""

from tml.serve.protocol import VERSION, Frame, Kind, ProtocolError, decode, encode

__all__ = ["VERSION", "Frame", "Kind", "ProtocolError", "decode", "encode"]
