"""Log-mel and dMel features, matching Inkling's reference front end exactly.

The reference is ``transformers.models.inkling``: ``InklingFeatureExtractor`` (log-mel)
followed by ``InklingProcessor._extract_dmel_bins`` (quantisation). Conventions:

* 16 kHz mono, hop 800 samples (50 ms, 20 frames/s, so 4 frames per 200 ms micro-turn),
  window 1600 samples (100 ms, periodic Hann), ``n_fft`` = window length.
* Framing: ``n_fft - hop`` zeros on the left, zeros on the right up to a multiple of the
  hop, no centring; ``T = ceil(S / 800)`` frames for ``S`` samples. Frame ``t`` covers
  samples ``[800 (t - 1), 800 (t + 1))`` of the input, so it ends where the hop ends.
* Magnitude spectrum ``sqrt(max(re^2 + im^2, 1e-10))``, 80 Slaney-scale, Slaney-normalised
  mel filters over 0-8 kHz, ``log10(max(mel, 1e-10))``.
* dMel: clamp to [-7, 2], nearest of 16 centres ``linspace(-7, 2, 16)`` (float64 cast to
  float32), ties to the lower index (``argmin``'s first occurrence).

Only numpy is used (no torch, no jax); everything is vectorised and processed in chunks
of frames, so memory stays bounded for long recordings.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft as _fft
import scipy.sparse as _sparse

__all__ = [
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

SAMPLE_RATE = 16000
"""Samples per second of the dMel front end."""
N_MELS = 80
"""Mel channels per frame."""
HOP_LENGTH = 800
"""STFT hop in samples (50 ms): one dMel frame per hop."""
WIN_LENGTH = 1600
"""STFT window in samples (100 ms)."""
N_FFT = 1600
"""FFT size (= window length): ``N_FFT // 2 + 1 = 801`` frequency bins, 10 Hz apart."""
N_BINS = 16
"""dMel quantisation levels per mel channel."""
DMEL_MIN = -7.0
"""Lowest dMel bin centre (log10 units); values below are clamped to it."""
DMEL_MAX = 2.0
"""Highest dMel bin centre (log10 units); values above are clamped to it."""
FRAMES_PER_MICRO_TURN = 4
"""dMel frames per 200 ms micro-turn."""

_N_FREQ = N_FFT // 2 + 1
_CHUNK_FRAMES = 128  # frames per vectorised block (~0.8 MB of float32 frames: stays in cache)

BIN_CENTERS: np.ndarray = np.linspace(DMEL_MIN, DMEL_MAX, N_BINS, dtype=np.float64).astype(np.float32)
"""float32 ``[16]`` dMel bin centres, exactly the reference's (float64 linspace cast to float32)."""
BIN_CENTERS.setflags(write=False)

if N_FFT != 2 * HOP_LENGTH or WIN_LENGTH != N_FFT:  # pragma: no cover - guards the fast paths below
    raise AssertionError("framing below assumes n_fft == win_length == 2 * hop")


def num_frames(num_samples: int) -> int:
    """Frames of log-mel / dMel for ``num_samples`` samples: ``ceil(num_samples / 800)``."""
    return -(-int(num_samples) // HOP_LENGTH)


@functools.lru_cache(maxsize=None)
def hann_window() -> np.ndarray:
    """Periodic Hann window ``0.5 - 0.5 cos(2 pi n / 1600)``, float32 ``[1600]``, read-only.

    Correctly rounded from float64. ``torch.hann_window(1600, periodic=True)`` (the
    reference's, computed with a vectorised float32 cosine) differs by 1 ulp in ~90 of the
    1600 samples, which moves speech log-mel values by at most a few 1e-5 (log10 units).
    """
    n = np.arange(WIN_LENGTH, dtype=np.float64)
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / WIN_LENGTH)).astype(np.float32)
    w.setflags(write=False)
    return w


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    logstep = 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-300) / 1000.0) * logstep, 3.0 * f / 200.0)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), 200.0 * m / 3.0)


@functools.lru_cache(maxsize=None)
def mel_filterbank(
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filters (cached, read-only).

    Same construction as ``transformers.audio_utils.mel_filter_bank(..., norm="slaney",
    mel_scale="slaney")`` and librosa's ``filters.mel``: computed in float64, then cast to
    float32 as the Inkling extractor does.

    Returns:
        float32 ``[n_fft // 2 + 1, n_mels]`` (``[801, 80]`` by default): ``mel = mag @ fb``.
    """
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    mel_pts = np.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), n_mels + 2)
    filter_freqs = _mel_to_hz_slaney(mel_pts)
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    fb *= (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))[None, :]
    fb = np.ascontiguousarray(fb, dtype=np.float32)
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=None)
def _filterbank_csr() -> tuple[_sparse.csr_matrix, _sparse.csr_matrix]:
    """The default filterbank (and its transpose) as CSR: 1565 of 64080 entries are non-zero.

    Sparse products are ~40x fewer operations than dense ones and, unlike BLAS, never
    spawn threads (multi-threaded small GEMMs collapse on a busy machine).
    """
    fb = mel_filterbank()
    return _sparse.csr_matrix(fb), _sparse.csr_matrix(np.ascontiguousarray(fb.T))


def _project(x: np.ndarray, m: _sparse.csr_matrix) -> np.ndarray:
    """``x @ m`` for dense ``x [T, a]`` and sparse ``m [a, b]``, float32 ``[T, b]``."""
    return np.asarray(m.T @ x.T).T.astype(np.float32, copy=False)


def _as_wave(wave: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(wave)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{what} expects float samples in [-1, 1], got dtype {x.dtype}; "
            "scale integer PCM first (e.g. int16 / 32768)"
        )
    if x.ndim != 1:
        raise ValueError(
            f"{what} expects mono samples [S] at {SAMPLE_RATE} Hz, got shape {x.shape}; "
            "downmix with x.mean(axis=1) or use tml.audio.load_audio"
        )
    return x.astype(np.float32, copy=False)


def _frames(padded_blocks: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``[T + 1, hop]`` blocks of the padded signal -> windowed frames ``[T, n_fft]``."""
    w = hann_window().astype(dtype, copy=False)
    out = np.empty((padded_blocks.shape[0] - 1, N_FFT), dtype)
    np.multiply(padded_blocks[:-1], w[:HOP_LENGTH], out=out[:, :HOP_LENGTH])
    np.multiply(padded_blocks[1:], w[HOP_LENGTH:], out=out[:, HOP_LENGTH:])
    return out


def _chunk_blocks(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Blocks ``[stop - start + 1, hop]`` of the padded signal feeding frames ``start..stop-1``.

    The padded signal is ``n_fft - hop`` zeros, then ``x``, then zeros up to a multiple of
    the hop; frame ``t`` spans padded blocks ``t`` and ``t + 1``, i.e. samples
    ``[hop (t - 1), hop (t + 1))`` of ``x``.
    """
    lo, hi = (start - 1) * HOP_LENGTH, stop * HOP_LENGTH
    if lo >= 0 and hi <= x.shape[0]:
        return x[lo:hi].reshape(-1, HOP_LENGTH)
    buf = np.zeros(hi - lo, x.dtype)
    a, b = max(lo, 0), min(hi, x.shape[0])
    if b > a:
        buf[a - lo : b - lo] = x[a:b]
    return buf.reshape(-1, HOP_LENGTH)


def _stft(blocks: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Padded blocks ``[T + 1, hop]`` -> complex spectrum ``[T, 801]``."""
    return _fft.rfft(_frames(blocks, dtype), n=N_FFT, axis=-1, overwrite_x=True)


def log_mel(wave: np.ndarray, *, precision: str = "float32") -> np.ndarray:
    """Log10 mel spectrogram of 16 kHz mono audio, as ``InklingFeatureExtractor`` computes it.

    Args:
        wave: float ``[S]`` samples at 16 kHz (any ``S >= 0``; not required to be a
            multiple of the hop).
        precision: ``"float32"`` (default, like the reference; > 3000 s of audio per
            second on one core) or ``"float64"`` (FFT in double precision, about half as
            fast). They differ only where a value lies ~120 dB or more below its frame's
            energy, which float32 cannot resolve (pure synthetic tones, band-limited
            audio); the reference's own float32 FFT is just as uncertain there.

    Returns:
        float32 ``[T, 80]`` with ``T = ceil(S / 800)``; values are ``log10`` of mel
        magnitudes, ``>= -10`` (digital silence gives about -6.0).
    """
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    dtype = np.dtype(precision).type
    x = _as_wave(wave, "log_mel")
    n_frames = num_frames(x.shape[0])
    out = np.empty((n_frames, N_MELS), np.float32)
    fb_csr, _ = _filterbank_csr()
    floor = dtype(1e-10)
    for start in range(0, n_frames, _CHUNK_FRAMES):
        stop = min(start + _CHUNK_FRAMES, n_frames)
        spec = _stft(_chunk_blocks(x, start, stop), dtype)
        ri = spec.view(dtype).reshape(stop - start, _N_FREQ, 2)
        mag = ri[..., 0] * ri[..., 0]
        mag += ri[..., 1] * ri[..., 1]
        np.maximum(mag, floor, out=mag)  # the reference clamps the power, then takes sqrt
        np.sqrt(mag, out=mag)
        mel = _project(mag.astype(np.float32, copy=False), fb_csr)
        np.maximum(mel, np.float32(1e-10), out=mel)
        np.log10(mel, out=out[start:stop])
    return out


def dmel_bins(log_mel_frames: np.ndarray) -> np.ndarray:
    """Quantise log-mel values to dMel bin indices, exactly as ``InklingProcessor`` does.

    Each value is clamped to ``[DMEL_MIN, DMEL_MAX]`` and mapped to the nearest of
    :data:`BIN_CENTERS` (float32 distances, ties to the lower index like ``argmin``).
    Only the two neighbouring centres are compared, so it costs O(1) per value.

    Args:
        log_mel_frames: float ``[..., 80]`` (typically ``[T, 80]``) log10 mel values.

    Returns:
        uint8 array of the same shape with values in ``[0, 15]``.
    """
    x = np.asarray(log_mel_frames, dtype=np.float32)
    x = np.clip(x, np.float32(DMEL_MIN), np.float32(DMEL_MAX))
    step = (DMEL_MAX - DMEL_MIN) / (N_BINS - 1)
    lo = np.floor((x - np.float32(DMEL_MIN)) / np.float32(step)).astype(np.int64)
    np.clip(lo, 0, N_BINS - 2, out=lo)
    d_lo = np.abs(x - BIN_CENTERS[lo])
    d_hi = np.abs(x - BIN_CENTERS[lo + 1])
    return (lo + (d_hi < d_lo)).astype(np.uint8)


def dmel_values(bins: np.ndarray) -> np.ndarray:
    """Dequantise dMel bins to their centres (log10 mel units).

    Args:
        bins: integer ``[..., 80]`` in ``[0, 15]``.

    Returns:
        float32 array of the same shape.
    """
    b = np.asarray(bins)
    if b.size and (b.min() < 0 or b.max() >= N_BINS):
        raise ValueError(f"dMel bins must lie in [0, {N_BINS - 1}], got range [{b.min()}, {b.max()}]")
    return BIN_CENTERS[b.astype(np.intp, copy=False)]


def dmel(wave: np.ndarray) -> np.ndarray:
    """dMel tokens of 16 kHz mono audio: ``dmel_bins(log_mel(wave))``.

    Args:
        wave: float ``[S]`` at 16 kHz.

    Returns:
        uint8 ``[ceil(S / 800), 80]`` bin indices in ``[0, 15]``.
    """
    return dmel_bins(log_mel(wave))


@functools.lru_cache(maxsize=None)
def _filterbank_pinv() -> np.ndarray:
    p = np.linalg.pinv(mel_filterbank().astype(np.float64)).astype(np.float32)  # [80, 801]
    p.setflags(write=False)
    return p


def mel_to_magnitude(mel: np.ndarray, n_iter: int = 30) -> np.ndarray:
    """Linear mel magnitudes ``[T, 80]`` -> non-negative STFT magnitudes ``[T, 801]``.

    Starts from the Moore-Penrose pseudo-inverse of the filterbank (clipped to the
    reference's magnitude floor ``1e-5 = sqrt(1e-10)``, since it has negative lobes), then
    refines it with ``n_iter`` multiplicative (Richardson-Lucy) updates, which keep the
    magnitudes non-negative and fit every mel band in ratio, so quiet bands are matched
    as well as loud ones. ``n_iter=0`` gives the clipped pseudo-inverse alone.

    Returns:
        float32 ``[T, 801]``, every value ``>= 1e-5``.
    """
    mel = np.maximum(np.asarray(mel, np.float32), np.float32(1e-30))
    if mel.ndim != 2 or mel.shape[1] != N_MELS:
        raise ValueError(f"mel_to_magnitude expects mel magnitudes [T, {N_MELS}], got shape {mel.shape}")
    # einsum rather than BLAS: no thread pool (see _filterbank_csr)
    mag = np.einsum("tm,mk->tk", mel, _filterbank_pinv()).astype(np.float32, copy=False)
    np.maximum(mag, np.float32(1e-5), out=mag)
    if n_iter > 0:
        fb_csr, fb_t_csr = _filterbank_csr()
        rowsum = mel_filterbank().sum(axis=1)
        inv_rowsum = np.where(rowsum > 0, 1.0 / np.where(rowsum > 0, rowsum, 1.0), 0.0).astype(np.float32)
        for _ in range(n_iter):
            ratio = mel / np.maximum(_project(mag, fb_csr), np.float32(1e-30))
            mag *= _project(ratio, fb_t_csr) * inv_rowsum
        np.maximum(mag, np.float32(1e-5), out=mag)
    return mag


def _istft(spec: np.ndarray, n_frames: int, wss_inv: np.ndarray) -> np.ndarray:
    """Least-squares inverse of :func:`_stft`: spectrum ``[T, 801]`` -> blocks ``[T + 1, hop]``.

    Frames are inverse-transformed, windowed and overlap-added; ``wss_inv`` divides by the
    summed squared window. The left-pad block is zeroed (the analysis knows it is silent).
    """
    frames = _fft.irfft(spec, n=N_FFT, axis=-1).astype(np.float32, copy=False)
    frames *= hann_window()
    blocks = np.zeros((n_frames + 1, HOP_LENGTH), np.float32)
    blocks[:-1] += frames[:, :HOP_LENGTH]
    blocks[1:] += frames[:, HOP_LENGTH:]
    blocks *= wss_inv
    blocks[0] = 0.0
    return blocks


def _window_sumsquare_inv(n_frames: int, floor: float = 0.1) -> np.ndarray:
    w2 = hann_window().astype(np.float32) ** 2
    wss = np.zeros((n_frames + 1, HOP_LENGTH), np.float32)
    wss[:-1] += w2[:HOP_LENGTH]
    wss[1:] += w2[HOP_LENGTH:]
    # Interior blocks have wss in [0.5, 1]. Only the last block (covered by the decaying half
    # of the last window alone) falls below the floor: it fades out instead of blowing up.
    return 1.0 / np.maximum(wss, np.float32(floor))


def griffin_lim(
    magnitude: np.ndarray, n_iter: int = 32, seed: int = 0, momentum: float = 0.99
) -> np.ndarray:
    """Waveform whose STFT magnitude approximates ``magnitude`` (fast Griffin-Lim).

    Same framing as :func:`log_mel` (left pad 800, periodic Hann 1600, hop 800, no
    centring). Starts from uniformly random phases drawn from ``seed`` and uses the
    momentum variant of Perraudin et al. (2013), as librosa does; deterministic for a seed.

    Args:
        magnitude: float ``[T, 801]`` STFT magnitudes.
        n_iter: iterations (each one STFT and one inverse STFT).
        seed: seed of the initial phases.
        momentum: 0 gives plain Griffin-Lim.

    Returns:
        float32 ``[T * 800]`` samples at 16 kHz.
    """
    mag = np.asarray(magnitude, np.float32)
    if mag.ndim != 2 or mag.shape[1] != _N_FREQ:
        raise ValueError(f"griffin_lim expects magnitudes [T, {_N_FREQ}], got shape {mag.shape}")
    n_frames = mag.shape[0]
    if n_frames == 0:
        return np.zeros(0, np.float32)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=mag.shape)
    angles = np.exp(1j * phase).astype(np.complex64)
    wss_inv = _window_sumsquare_inv(n_frames)
    rebuilt = np.zeros_like(angles)
    beta = np.float32(momentum / (1.0 + momentum))
    tiny = np.float32(1e-16)
    for _ in range(n_iter):
        prev = rebuilt
        rebuilt = _stft(_istft(mag * angles, n_frames, wss_inv))
        angles = rebuilt - beta * prev
        angles /= np.abs(angles) + tiny
    blocks = _istft(mag * angles, n_frames, wss_inv)
    return np.ascontiguousarray(blocks[1:].reshape(-1))


def waveform_from_dmel(bins: np.ndarray, n_iter: int = 32, seed: int = 0) -> np.ndarray:
    """Vocode dMel bins back to audio without weights (dequantise, invert mel, Griffin-Lim).

    ``10 ** dmel_values(bins)`` gives mel magnitudes, the filterbank pseudo-inverse (refined
    to stay non-negative) gives STFT magnitudes (:func:`mel_to_magnitude`), and
    :func:`griffin_lim` finds phases.
    Intelligible but buzzy; a neural vocoder can replace it.

    Args:
        bins: integer ``[T, 80]`` dMel bins.
        n_iter: Griffin-Lim iterations.
        seed: seed of the initial phases (the output is deterministic for a seed).

    Returns:
        float32 ``[T * 800]`` samples at 16 kHz.
    """
    b = np.asarray(bins)
    if b.ndim != 2 or b.shape[1] != N_MELS:
        raise ValueError(f"waveform_from_dmel expects bins [T, {N_MELS}], got shape {b.shape}")
    mel = np.power(np.float32(10.0), dmel_values(b))
    return griffin_lim(mel_to_magnitude(mel), n_iter=n_iter, seed=seed)
