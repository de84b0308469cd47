"""Audio I/O: decode any libsndfile format, resample, write atomically, FLAC bytes for shards.

Every array returned here is ``float32`` in [-1, 1] (for integer formats), laid out as
``[S, C]`` (samples, channels) or ``[S]`` for mono. Only numpy, scipy and soundfile are
imported: no torch, no jax.

Bad input raises :class:`AudioError` (a ``ValueError``) whose message names the source,
the reason and what to do about it, so a data pipeline can put it in a rejects report.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

__all__ = [
    "AudioError",
    "AudioSource",
    "read_audio",
    "load_audio",
    "resample",
    "write_audio",
    "encode_flac",
    "decode_audio_bytes",
]

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]
"""A path, raw encoded bytes, or a binary file object (anything libsndfile decodes)."""

_FORMATS_HINT = (
    "libsndfile reads WAV/RF64/W64, FLAC, OGG (Vorbis, Opus), MP3, AIFF, AU/SND, CAF and a few more"
)


class AudioError(ValueError):
    """Audio that cannot be used: missing, corrupt, truncated, unsupported, empty, NaN, wrong channels.

    ``source`` is the display name of the input and ``reason`` a short machine-friendly
    cause (for rejects reports); ``str(err)`` is the full human message with advice.
    """

    def __init__(self, source: str, reason: str, advice: str = ""):
        self.source = source
        self.reason = reason
        self.advice = advice
        msg = f"cannot use audio {source}: {reason}"
        if advice:
            msg += f". {advice}"
        super().__init__(msg)

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.source, self.reason, self.advice))


def _source_name(src, name: str | None) -> str:
    if name is not None:
        return repr(str(name))
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    fname = getattr(src, "name", None)
    if isinstance(fname, (str, bytes, os.PathLike)):
        return repr(os.fsdecode(fname))
    return f"<{type(src).__name__}>"


def _open_target(src, display: str):
    """Return something ``sf.SoundFile`` can open (path string or seekable file object)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise AudioError(display, "file not found", "Check the path (and the manifest that named it)")
        if os.path.isdir(path):
            raise AudioError(display, "is a directory, not an audio file", "Pass the path of an audio file")
        if os.path.getsize(path) == 0:
            raise AudioError(display, "empty file (0 bytes)", "Re-export or re-download the file")
        return path
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise AudioError(display, "empty input (0 bytes)", "Check the producer of these bytes")
        return io.BytesIO(bytes(src))
    if hasattr(src, "read"):
        seekable = getattr(src, "seekable", None)
        if seekable is not None and seekable():
            return src
        data = src.read()
        if not data:
            raise AudioError(display, "empty input (0 bytes)", "Check the producer of this stream")
        return io.BytesIO(data)
    raise TypeError(f"read_audio expects a path, bytes or a binary file object, got {type(src).__name__}")


_OPENING_PREFIX = re.compile(r"^Error opening (?:'.*'|\".*\"|<[^>]*>|\S+): ")


def _explain_libsndfile(msg: str) -> tuple[str, str]:
    detail = _OPENING_PREFIX.sub("", msg.strip()).strip().rstrip(".")
    low = detail.lower()
    if "format not recognised" in low or "unimplemented format" in low or "not a regular file" in low:
        return (
            f"unsupported or unrecognised audio format ({detail})",
            f"{_FORMATS_HINT}; convert it first, e.g. `ffmpeg -i IN -ar 16000 OUT.flac`",
        )
    if any(k in low for k in ("lost sync", "decoder", "malformed", "no 'data' chunk", "truncat", "unexpected end")):
        return (
            f"corrupt or truncated file ({detail})",
            "Re-export or re-download it; a partial copy or an interrupted write is the usual cause",
        )
    return (f"libsndfile could not decode it ({detail})", "Check that the file is a complete, valid audio file")


# libsndfile's header log reports chunk sizes that exceed the bytes present, e.g.
# "data : 64000 (should be 31978)" (WAV), "SSND : ..." (AIFF), "Data Size : ..." (AU),
# "riff : ..." (W64), "Riff size : ..." (RF64). Streaming writers that cannot seek back put
# placeholders there (0, 0x7FFFF000 by espeak-ng --stdout, 0xFFFFFFFF, ...): a size of 0 or
# >= 0x7FFF0000 means "unknown length" and is not evidence of truncation.
_SIZE_MISMATCH = re.compile(
    r"^\s*(data|SSND|Data Size|RIFF|riff|FORM|Riff size)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE
)


def _truncation_from_header(info: str) -> tuple[int, int] | None:
    for m in _SIZE_MISMATCH.finditer(info):
        declared, present = int(m.group(2)), int(m.group(3))
        if 0 < declared < 0x7FFF0000 and present + 16 < declared:
            return declared, present
    return None


def read_audio(
    src: AudioSource, channels: int | None = None, *, name: str | None = None
) -> tuple[np.ndarray, int]:
    """Decode an audio file, file object or encoded bytes.

    Args:
        src: path, encoded bytes, or a binary file object, in any format libsndfile reads
            (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...).
        channels: if given, the exact number of channels required (e.g. ``2`` for a
            two-party conversation); any other count raises :class:`AudioError`.
        name: display name for error messages (defaults to the path or ``<N bytes>``).

    Returns:
        ``(x, sample_rate)`` with ``x`` float32 of shape ``[S, C]`` (always 2-D), ``S >= 1``,
        every sample finite.

    Raises:
        AudioError: missing, corrupt, truncated, unsupported, empty, non-finite samples,
            or a channel count different from ``channels``.
    """
    display = _source_name(src, name)
    target = _open_target(src, display)
    try:
        with sf.SoundFile(target) as f:
            sample_rate = int(f.samplerate)
            declared = int(f.frames)
            n_channels = int(f.channels)
            x = f.read(dtype="float32", always_2d=True)
            info = f.extra_info or ""
    except sf.LibsndfileError as e:
        reason, advice = _explain_libsndfile(str(e))
        raise AudioError(display, reason, advice) from e
    except (RuntimeError, ValueError, TypeError, EOFError) as e:
        raise AudioError(display, f"could not decode it ({e})", "Check that it is a valid audio file") from e

    mismatch = _truncation_from_header(info)
    if mismatch is not None:
        raise AudioError(
            display,
            f"truncated file (header declares {mismatch[0]} bytes, only {mismatch[1]} present)",
            "Re-export or re-download it; a partial copy or an interrupted write is the usual cause",
        )
    if x.shape[0] == 0:
        raise AudioError(
            display,
            "contains no decodable samples (empty, or truncated/corrupt)",
            "Drop it, or re-export it if it should contain audio",
        )
    if declared > 0 and x.shape[0] < declared:
        raise AudioError(
            display,
            f"truncated file (header declares {declared} frames, only {x.shape[0]} decodable)",
            "Re-export or re-download it; a partial copy or an interrupted write is the usual cause",
        )
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise AudioError(
            display,
            f"contains {bad} NaN or infinite sample(s)",
            "The producer wrote invalid floats; regenerate the file",
        )
    if channels is not None and n_channels != channels:
        raise AudioError(
            display,
            f"has {n_channels} channel(s), expected {channels}",
            "Use audio with the required channel layout (e.g. stereo with one speaker per channel), "
            "or convert it with `sox IN -c N OUT` / `ffmpeg -i IN -ac N OUT`",
        )
    return np.ascontiguousarray(x, dtype=np.float32), sample_rate


def load_audio(
    src: AudioSource,
    sample_rate: int = 16000,
    mono: bool = True,
    *,
    channels: int | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Decode and convert to ``sample_rate`` (and mono, by the mean over channels).

    Args:
        src: as for :func:`read_audio`.
        sample_rate: output rate in Hz (16 kHz, the dMel front end's rate, by default).
        mono: downmix by averaging the channels.
        channels: required channel count of the *source* (checked before downmixing).
        name: display name for error messages.

    Returns:
        float32 ``[S']`` if ``mono`` else ``[S', C]``, with
        ``S' = round(S * sample_rate / source_rate)`` (see :func:`resample`).
    """
    x, sr = read_audio(src, channels=channels, name=name)
    if mono:
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    return resample(x, sr, sample_rate)


def _check_rate(rate, what: str) -> int:
    r = int(rate)
    if r != rate or r <= 0:
        raise ValueError(f"{what} must be a positive integer number of Hz, got {rate!r}")
    return r


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample along axis 0 by the exact rational factor ``sr_out / sr_in``.

    Polyphase FIR (``scipy.signal.resample_poly``, Kaiser window) with the factor reduced
    by the gcd, e.g. 44100 -> 16000 is up 160 / down 441. Any positive integer rates work.

    Args:
        x: ``[S]`` or ``[S, C]`` samples.
        sr_in, sr_out: integer rates in Hz.

    Returns:
        float32 array of ``round(S * sr_out / sr_in)`` samples (halves round up) along axis 0,
        other axes unchanged. Returns ``x`` as float32 unchanged when the rates are equal.
    """
    sr_in = _check_rate(sr_in, "sr_in")
    sr_out = _check_rate(sr_out, "sr_out")
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if sr_in == sr_out:
        return x
    n = x.shape[0]
    n_out = (2 * n * sr_out + sr_in) // (2 * sr_in)  # round half up, exact in integers
    if n == 0:
        return np.zeros((0,) + x.shape[1:], np.float32)
    frac = Fraction(sr_out, sr_in)
    y = resample_poly(x, frac.numerator, frac.denominator, axis=0)
    if y.shape[0] >= n_out:
        y = y[:n_out]
    else:
        pad = [(0, n_out - y.shape[0])] + [(0, 0)] * (y.ndim - 1)
        y = np.pad(y, pad)
    return np.ascontiguousarray(y, dtype=np.float32)


def _as_frames(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (1, 2):
        raise ValueError(f"{what}: expected samples [S] or [S, C], got shape {x.shape}")
    if x.ndim == 2 and x.shape[1] > 64:
        raise ValueError(f"{what}: shape {x.shape} has {x.shape[1]} channels; arrays are [S, C] (transpose it?)")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: expected float samples in [-1, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: samples contain NaN or infinity")
    return x


def _clip_for_pcm(x: np.ndarray, subtype: str | None, fmt: str) -> np.ndarray:
    st = subtype or sf.default_subtype(fmt)
    if st is not None and (st.startswith("PCM") or st in ("ULAW", "ALAW")) or fmt in ("FLAC", "MP3", "OGG"):
        # Integer encodings wrap around instead of saturating; clip explicitly.
        return np.clip(x, -1.0, 1.0)
    return x


def write_audio(
    path: str | os.PathLike,
    x: np.ndarray,
    sample_rate: int,
    *,
    format: str | None = None,
    subtype: str | None = None,
) -> Path:
    """Write ``x`` (float ``[S]`` or ``[S, C]``) to ``path`` atomically.

    The file is written to a temporary file in the same directory and moved into place
    with ``os.replace``, so a reader never sees a half-written file, and a crash leaves
    no partial output. The format comes from the extension unless ``format`` is given;
    ``subtype`` defaults to libsndfile's (16-bit PCM for WAV and FLAC). Integer
    encodings clip samples to [-1, 1].

    Returns:
        The destination path.
    """
    path = Path(path)
    sample_rate = _check_rate(sample_rate, "sample_rate")
    x = _as_frames(x, f"write_audio({str(path)!r})")
    fmt = (format or path.suffix.lstrip(".")).upper()
    if fmt not in sf.available_formats():
        raise ValueError(
            f"write_audio({str(path)!r}): unknown format {fmt!r}; use an extension such as "
            ".wav or .flac, or pass format="
        )
    x = _clip_for_pcm(x, subtype, fmt)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            sf.write(fh, x, sample_rate, format=fmt, subtype=subtype)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def encode_flac(x: np.ndarray, sample_rate: int, *, subtype: str = "PCM_16") -> bytes:
    """Encode float ``[S]`` or ``[S, C]`` samples as FLAC bytes (lossless at 16/24 bit).

    Used for webdataset shard members. Samples are clipped to [-1, 1] and quantised to
    ``subtype`` (``"PCM_16"`` or ``"PCM_24"``). Decode with :func:`decode_audio_bytes`.
    """
    sample_rate = _check_rate(sample_rate, "sample_rate")
    x = _as_frames(x, "encode_flac")
    if x.shape[0] == 0:
        raise ValueError("encode_flac: no samples to encode")
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), sample_rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


def decode_audio_bytes(
    b: bytes, channels: int | None = None, *, name: str | None = None
) -> tuple[np.ndarray, int]:
    """Decode encoded audio bytes (FLAC, WAV, ...): same contract as :func:`read_audio`.

    Returns:
        ``(x, sample_rate)`` with ``x`` float32 ``[S, C]``.
    """
    return read_audio(bytes(b), channels=channels, name=name)
