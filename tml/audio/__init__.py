"""tml.audio: audio I/O, resampling, log-mel and dMel features, Griffin-Lim vocoding.

Matches the Inkling reference front end (``transformers.models.inkling``) exactly; see
:mod:`tml.audio.features` for the conventions. Runtime dependencies are numpy, scipy and
soundfile only (no torch, no jax).

Shapes: waveforms are float32 ``[S]`` (mono) or ``[S, C]``; log-mel is float32 ``[T, 80]``
and dMel bins uint8 ``[T, 80]`` with ``T = ceil(S / 800)`` at 16 kHz (20 frames/s,
4 frames per 200 ms micro-turn).
"""

from tml.audio.features import (
    BIN_CENTERS,
    DMEL_MAX,
    DMEL_MIN,
    FRAMES_PER_MICRO_TURN,
    HOP_LENGTH,
    N_BINS,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    WIN_LENGTH,
    dmel,
    dmel_bins,
    dmel_values,
    griffin_lim,
    hann_window,
    log_mel,
    mel_filterbank,
    mel_to_magnitude,
    num_frames,
    waveform_from_dmel,
)
from tml.audio.io import (
    AudioError,
    AudioSource,
    decode_audio_bytes,
    encode_flac,
    load_audio,
    read_audio,
    resample,
    write_audio,
)

__all__ = [
    # constants
    "SAMPLE_RATE",
    "N_MELS",
    "HOP_LENGTH",
    "WIN_LENGTH",
    "N_FFT",
    "N_BINS",
    "DMEL_MIN",
    "DMEL_MAX",
    "FRAMES_PER_MICRO_TURN",
    "BIN_CENTERS",
    # I/O
    "AudioError",
    "AudioSource",
    "read_audio",
    "load_audio",
    "resample",
    "write_audio",
    "encode_flac",
    "decode_audio_bytes",
    # features
    "num_frames",
    "hann_window",
    "mel_filterbank",
    "log_mel",
    "dmel_bins",
    "dmel_values",
    "dmel",
    "mel_to_magnitude",
    "griffin_lim",
    "waveform_from_dmel",
]
