"""Random micro-turns for stream tests (no audio needed)."""

import numpy as np

from tml.stream import MicroTurn

WORDS = ["hi", "okay", "wait", "three", "go", "so é", "yes"]


def random_turns(rng: np.random.Generator, n: int, video_every: int = 3) -> list[MicroTurn]:
    turns = []
    for t in range(n):
        has_video = video_every and t % video_every == 0
        speak = rng.random() < 0.5
        turns.append(
            MicroTurn(
                user_audio=rng.integers(0, 16, (4, 80), dtype=np.uint8),
                video=rng.integers(0, 256, (int(rng.integers(1, 4)), 2, 40, 40, 3), dtype=np.uint8)
                if has_video else None,
                typed=str(rng.choice(WORDS)) if rng.random() < 0.2 else "",
                background=str(rng.choice(WORDS)) if rng.random() < 0.1 else "",
                model_text=str(rng.choice(WORDS)) if rng.random() < 0.4 else "",
                model_speech=rng.integers(0, 16, (4, 80), dtype=np.uint8) if speak else None,
                control=tuple(rng.choice(["<backchannel>", "<delegate>"], int(rng.integers(0, 2)))),
            )
        )
    return turns


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


def toy_slice(first: int, stop: int, bad_every: int = 0):
    """Conversations first..stop-1; every `bad_every`-th is broken (for reject tests)."""
    from tml.data_pipelines.shards import Reject

    for i in range(first, stop):
        conv = toy_conversation(i)
        if bad_every and i % bad_every == 1:
            conv.user_audio[5] = np.nan
        if bad_every and i % bad_every == 2:
            yield Reject(f"input-{i}.wav", "truncated file")
            continue
        yield conv


def crash_after(first: int, stop: int, crash_at: int):
    for i in range(first, stop):
        if i == crash_at:
            raise KeyboardInterrupt("simulated kill")
        yield toy_conversation(i)
