"""One streaming session: its inputs checked and laid out, its committed history, its outputs.

Inputs of a micro-turn (:class:`TurnInputs`) are validated here, before anything is
queued, so bad input is an error to its caller only. User audio is turned into dMel the
way the corpus builder does it (:func:`tml.stream.conversation_dmel` runs
:func:`tml.audio.dmel` over the whole recording): dMel frame ``t`` covers samples
``[800 (t - 1), 800 (t + 1))``, so a micro-turn's 4 frames need its 3,200 samples and the
last 800 samples of the micro-turn before (zeros before the first, as the front end pads).
:func:`stream_dmel` keeps that tail, so streaming 200 ms at a time gives the same bins as
the whole recording (``tests/sampler/test_session.py``).

Micro-turn layout comes from :func:`tml.stream.layout` only; the engine appends the
decoded outputs token by token and commits a :class:`~tml.stream.MicroTurn` holding
inputs and outputs, so ``layout(session.turns)`` is exactly the row the engine fed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tml.audio import HOP_LENGTH, SAMPLE_RATE, dmel
from tml.sampler.sampling import SamplingParams
from tml.stream import SAMPLES_PER_MICRO_TURN, MicroTurn, Tokens
from tml.stream.micro_turns import FRAMES_PER_MICRO_TURN, N_MELS
from tml.vision import frames_to_patches


@dataclass
class TurnInputs:
    """One 200 ms micro-turn of input.

    Exactly one of:
        audio: float [3200] user samples at 16 kHz in [-1, 1] (``sample_rate`` must be 16000;
            resample with :func:`tml.audio.resample` first);
        dmel: uint8/int [4, 80] dMel bins in [0, 15].
    Optional:
        video: uint8 [2, H, W, 3] the micro-turn's frame pair (an image [H, W, 3] is
            duplicated), cut into 40×40×2 patches by :func:`tml.vision.frames_to_patches`.
        typed, background: text the user typed / a background result that arrived.
    """

    audio: np.ndarray | None = None
    dmel: np.ndarray | None = None
    sample_rate: int = SAMPLE_RATE
    video: np.ndarray | None = None
    typed: str = ""
    background: str = ""


def stream_dmel(tail: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tail float32 [800] (the previous micro-turn's last hop), samples float32 [3200] →
    (uint8 [4, 80] this micro-turn's dMel, the new tail [800])."""
    x = np.concatenate([tail, samples])                 # 5 hops: frame j covers hops j-1, j
    return dmel(x)[1:1 + FRAMES_PER_MICRO_TURN], samples[-HOP_LENGTH:].copy()


def check_inputs(inp: TurnInputs, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Validate one micro-turn's inputs → (dMel [4, 80] uint8, patches or None, new tail).

    Raises ValueError naming the problem and what to do."""
    if (inp.audio is None) == (inp.dmel is None):
        raise ValueError("a micro-turn needs exactly one of audio= (3200 samples at 16 kHz) or dmel= ([4, 80] bins)")
    if inp.audio is not None:
        if inp.sample_rate != SAMPLE_RATE:
            raise ValueError(f"audio at {inp.sample_rate} Hz: the model hears {SAMPLE_RATE} Hz; resample it first "
                             "(tml.audio.resample)")
        a = np.asarray(inp.audio)
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"audio must be float samples in [-1, 1], got dtype {a.dtype} (scale int16 by 1/32768)")
        if a.shape != (SAMPLES_PER_MICRO_TURN,):
            raise ValueError(f"audio must be one 200 ms micro-turn: {SAMPLES_PER_MICRO_TURN} mono samples at "
                             f"{SAMPLE_RATE} Hz, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("audio holds non-finite samples (NaN/inf): clean the input stream")
        bins, tail = stream_dmel(tail, a.astype(np.float32))
    else:
        b = np.asarray(inp.dmel)
        if b.shape != (FRAMES_PER_MICRO_TURN, N_MELS) or not np.issubdtype(b.dtype, np.integer):
            raise ValueError(f"dmel must be integer bins [{FRAMES_PER_MICRO_TURN}, {N_MELS}] (one micro-turn), "
                             f"got {b.dtype} {b.shape}")
        if b.min() < 0 or b.max() > 15:
            raise ValueError(f"dmel bins must lie in [0, 15], got [{b.min()}, {b.max()}]")
        bins = b.astype(np.uint8)
    patches = None
    if inp.video is not None:
        v = np.asarray(inp.video)
        if v.dtype != np.uint8 or v.ndim not in (3, 4) or v.shape[-1] != 3 or (v.ndim == 4 and v.shape[0] != 2):
            raise ValueError(f"video must be a uint8 RGB frame pair [2, H, W, 3] (or one image [H, W, 3]), "
                             f"got {v.dtype} {v.shape}")
        patches, _ = frames_to_patches(v if v.ndim == 4 else np.stack([v, v]))
    for name in ("typed", "background"):
        if not isinstance(getattr(inp, name), str):
            raise ValueError(f"{name} must be a str, got {type(getattr(inp, name)).__name__}")
    return bins, patches, tail


@dataclass
class TurnOutput:
    """What the model emitted in one micro-turn.

    text: the decoded text (``text_bytes`` the raw bytes); speech: uint8 [n, 80] frames
    (n = 4 or 0); waveform: float32 [n * 800] the vocoder's audio (None if disabled);
    control: the control actions; tokens / positions / logprobs: every output token after
    ``<out>`` (``<end>`` included), its slot in the session row, and its log-probability
    (at a ``<speech>`` position the frame's sum over the 80 channels);
    speech_channel_logprobs: float32 [n, 80]; forced_end: the budget forced ``<end>``.
    """

    micro_turn: int
    text: str
    text_bytes: bytes
    speech: np.ndarray
    waveform: np.ndarray | None
    control: tuple[str, ...]
    tokens: np.ndarray
    positions: np.ndarray
    logprobs: np.ndarray
    speech_channel_logprobs: np.ndarray
    forced_end: bool


@dataclass
class Pending:
    """A micro-turn appended but not yet served: its inputs and their layout."""

    turn: MicroTurn
    inputs: Tokens
    tail: np.ndarray


@dataclass
class Session:
    """A live session. ``starts[t]`` is the KV length before micro-turn t and ``tails[t]``
    the audio tail then (``len(starts) == len(turns) + 1``), so rollback is exact."""

    sid: int
    seed: int
    sampling: SamplingParams
    context: str
    turns: list[MicroTurn] = field(default_factory=list)
    outputs: list[TurnOutput] = field(default_factory=list)
    starts: list[int] = field(default_factory=lambda: [0])
    tails: list[np.ndarray] = field(default_factory=lambda: [np.zeros(HOP_LENGTH, np.float32)])
    pending: Pending | None = None

    @property
    def length(self) -> int:
        return self.starts[-1]

    @property
    def micro_turn(self) -> int:
        """Index of the next micro-turn."""
        return len(self.turns)
