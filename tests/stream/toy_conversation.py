"""The toy conversation shared by the stream and data-pipeline tests."""

import numpy as np


def toy_conversation(i: int, seed: int = 0):
    """A small conversation with tones for speech, aligned words, events and (some) video."""
    from tml.stream import Conversation, Event, Word

    rng = np.random.default_rng([seed, i])
    n = int(rng.integers(8, 30)) * 3200 + int(rng.integers(0, 3200))
    t = np.arange(n) / 16000
    user = (0.3 * np.sin(2 * np.pi * rng.uniform(150, 400) * t) * (t < n / 32000)).astype(np.float32)
    model = (0.3 * np.sin(2 * np.pi * rng.uniform(150, 400) * t) * (t >= n / 32000)).astype(np.float32)
    dur = n / 16000
    words = [Word("hello", 0.0, dur / 4, "user"), Word("sure", dur / 2, dur * 0.9, "model")]
    events = [Event(dur / 2, "model_text", "sure"), Event(0.1, "typed", "hi")]
    if i % 3 == 0:
        events.append(Event(dur * 0.6, "backchannel"))
    video = rng.integers(0, 256, (int(dur * 10), 40, 80, 3), dtype=np.uint8) if i % 4 == 0 else None
    return Conversation(f"toy-{seed}-{i:05d}", ["a", "b"][i % 2], user, model, words, events, video)
