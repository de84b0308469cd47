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
