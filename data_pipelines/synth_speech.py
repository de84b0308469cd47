"""A built-in, speech-like synthesiser: words → 16 kHz waveform with per-word times.

Nothing to install (numpy + scipy). It is a small formant synthesiser, not a TTS voice:
the output is not intelligible English, but it has the acoustic structure a dMel front end
and an interaction model need to learn from — voiced syllables with a pitch contour and
formants that move from phone to phone, noisy fricatives and stop bursts, pauses, phrase
intonation (falls, question rises, continuation rises before a mid-sentence pause) and
speaker identity.

How a word is made:

* **Letters → phones** by a few spelling rules and a small exception table
  (:func:`phonemize`); stops become closure + burst (+ aspiration), diphthongs two vowel
  targets; durations get lexical stress, phrase-final lengthening and random jitter.
* **Voiced source**: glottal impulses at pitch-synchronous instants from a phrase pitch
  contour (declination, accents on content words, final fall / question rise /
  continuation rise) with jitter and shimmer, plus small random impulses over each open
  phase (breathiness), shaped by a two-pole glottal low-pass and lip radiation.
* **Vocal tract**: a cascade of three Klatt formant resonators whose targets change per
  phone (scaled by the voice's vocal-tract length). Targets are switched by cross-fading
  the *excitation* between neighbouring phones (12 ms linear ramps) and summing the
  filtered parts, a linear time-varying filter with smooth transitions. The voiced part
  is computed at 8 kHz (F1-F3 lie below 4 kHz) and brought to 16 kHz by linear
  interpolation, whose images give voiced sounds some energy above 4 kHz.
* **Noise** (16 kHz): fricatives, bursts and aspiration are slices of band-passed noise
  tables (computed once per process from a fixed seed) under fade / decay envelopes.

Word times: a word spans its phones; voicing starts and stops inside them, and only the
resonators' ringing (< 20 ms, -40 dB) is left after a word's end.

Speed: all segments of one phone in an utterance are filtered with **one** IIR call
(their windowed excitations are concatenated, each followed by a zero tail that takes the
ringing), and everything else is a few vector operations per utterance, so the Python
work is per distinct phone, not per sample or per pulse: about 2,000 s of audio per
second on one core of the development machine (see :func:`benchmark`).

Determinism: the waveform is a pure function of (text, voice, seed, options); all
randomness comes from ``numpy.random.default_rng`` seeded by ``seed`` and from noise
tables generated from fixed seeds.

An optional ``backend="espeak"`` uses ``espeak-ng`` when it is on ``PATH`` (one call per
word, so word times stay exact); the default and the tests never need it.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.signal as _signal

__all__ = [
    "SAMPLE_RATE",
    "Voice",
    "MODEL_VOICE",
    "Speech",
    "synthesize",
    "phonemize",
    "number_words",
    "tokenize",
    "espeak_available",
    "benchmark",
]

SAMPLE_RATE = 16_000
_FS = float(SAMPLE_RATE)


# ---------------------------------------------------------------------------- voices


@dataclass(frozen=True)
class Voice:
    """Speaker parameters.

    Attributes:
        f0: mean pitch in Hz.
        pitch_range: intonation range as a fraction of ``f0``.
        formant_scale: vocal-tract length factor applied to all formants (1 = adult male,
            ~1.15 adult female).
        rate: speaking-rate factor (> 1 is faster).
        jitter: relative random perturbation of each glottal period.
        shimmer: relative random perturbation of each glottal pulse amplitude.
        breathiness: aspiration noise mixed into the voiced source (0..~0.3).
        open_quotient: open phase of the glottal cycle (0.4..0.75); larger is softer.
    """

    f0: float = 120.0
    pitch_range: float = 0.2
    formant_scale: float = 1.0
    rate: float = 1.0
    jitter: float = 0.01
    shimmer: float = 0.06
    breathiness: float = 0.05
    open_quotient: float = 0.6

    @classmethod
    def from_seed(cls, seed: int) -> Voice:
        """A random adult voice (about half low, half high pitched), deterministic in seed."""
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED])
        if rng.random() < 0.5:
            f0, scale = rng.uniform(85, 140), rng.uniform(0.94, 1.06)
        else:
            f0, scale = rng.uniform(165, 245), rng.uniform(1.08, 1.22)
        return cls(
            f0=float(f0),
            pitch_range=float(rng.uniform(0.12, 0.3)),
            formant_scale=float(scale),
            rate=float(rng.uniform(0.85, 1.2)),
            jitter=float(rng.uniform(0.004, 0.02)),
            shimmer=float(rng.uniform(0.03, 0.1)),
            breathiness=float(rng.uniform(0.0, 0.15)),
            open_quotient=float(rng.uniform(0.5, 0.7)),
        )


MODEL_VOICE = Voice(f0=175.0, pitch_range=0.18, formant_scale=1.12, rate=1.05,
                    jitter=0.006, shimmer=0.04, breathiness=0.04, open_quotient=0.6)
"""The model's own voice: one consistent speaker for every model speech target."""


@dataclass(frozen=True)
class Speech:
    """A synthesised utterance.

    Attributes:
        audio: float32 [N] at 16 kHz.
        words: ``(word, start, end)`` in seconds from the start of ``audio``.
    """

    audio: np.ndarray
    words: tuple[tuple[str, float, float], ...]

    @property
    def duration(self) -> float:
        return len(self.audio) / _FS


# ---------------------------------------------------------------------------- phones


@dataclass(frozen=True)
class _Phone:
    dur: float                                   # seconds at rate 1
    voice: float = 0.0                           # voicing amplitude
    formants: tuple[float, float, float] | None = None
    bw: tuple[float, float, float] = (70.0, 100.0, 150.0)
    noise: str | None = None                     # noise table key
    noise_amp: float = 0.0
    burst: bool = False                          # fast attack, decaying envelope


def _v(f1, f2, f3, dur):
    return _Phone(dur, 1.0, (f1, f2, f3))


PHONES: dict[str, _Phone] = {
    # vowels (Peterson & Barney, adult male)
    "iy": _v(270, 2290, 3010, 0.10), "ih": _v(390, 1990, 2550, 0.07),
    "eh": _v(530, 1840, 2480, 0.08), "ae": _v(660, 1720, 2410, 0.10),
    "aa": _v(730, 1090, 2440, 0.10), "ao": _v(570, 840, 2410, 0.10),
    "uh": _v(440, 1020, 2240, 0.07), "uw": _v(300, 870, 2240, 0.10),
    "ah": _v(640, 1190, 2390, 0.07), "er": _v(490, 1350, 1690, 0.10),
    "ax": _v(500, 1500, 2500, 0.05),
    # sonorants
    "m": _Phone(0.065, 0.35, (250, 1100, 2200), (100, 250, 300)),
    "n": _Phone(0.055, 0.35, (250, 1600, 2600), (100, 250, 300)),
    "ng": _Phone(0.06, 0.35, (250, 2000, 2700), (100, 250, 300)),
    "l": _Phone(0.05, 0.55, (360, 1100, 2600), (80, 120, 200)),
    "r": _Phone(0.05, 0.55, (420, 1250, 1600), (80, 120, 200)),
    "w": _Phone(0.045, 0.5, (300, 650, 2200), (80, 120, 200)),
    "y": _Phone(0.04, 0.5, (280, 2200, 3000), (80, 120, 200)),
    # voiced fricatives: low voicing plus frication
    "z": _Phone(0.08, 0.25, (250, 1700, 2600), (120, 200, 300), "s", 0.22),
    "v": _Phone(0.07, 0.3, (250, 1100, 2300), (120, 200, 300), "f", 0.1),
    "dh": _Phone(0.05, 0.3, (250, 1400, 2500), (120, 200, 300), "th", 0.08),
    "zh": _Phone(0.08, 0.25, (250, 1800, 2500), (120, 200, 300), "sh", 0.22),
    # unvoiced fricatives
    "s": _Phone(0.10, noise="s", noise_amp=0.35),
    "sh": _Phone(0.10, noise="sh", noise_amp=0.35),
    "f": _Phone(0.09, noise="f", noise_amp=0.12),
    "th": _Phone(0.08, noise="th", noise_amp=0.10),
    "hh": _Phone(0.06, noise="h", noise_amp=0.15),
    # stops: closure (silent or voice bar), burst, aspiration
    "cl": _Phone(0.045),
    "vcl": _Phone(0.045, 0.12, (200, 900, 2500), (150, 300, 400)),
    "p_b": _Phone(0.012, noise="p", noise_amp=0.4, burst=True),
    "t_b": _Phone(0.015, noise="t", noise_amp=0.45, burst=True),
    "k_b": _Phone(0.02, noise="k", noise_amp=0.45, burst=True),
    "b_b": _Phone(0.008, noise="p", noise_amp=0.25, burst=True),
    "d_b": _Phone(0.01, noise="t", noise_amp=0.3, burst=True),
    "g_b": _Phone(0.014, noise="k", noise_amp=0.3, burst=True),
    "asp": _Phone(0.03, noise="asp", noise_amp=0.15),
    "pau": _Phone(0.0),
}

# noise table key → band (Hz) of a 2nd-order Butterworth band-pass
_NOISE_BANDS = {
    "s": (3800, 7800), "sh": (1800, 5500), "f": (900, 7800), "th": (1400, 7800),
    "h": (400, 4500), "p": (300, 2200), "t": (2600, 7800), "k": (1200, 3800),
    "asp": (600, 5500),
}
_NOISE_TABLE_LEN = 1 << 16
_VOWELS = set("aeiou")
_STOPS = {
    "p": ("cl", "p_b", "asp"), "t": ("cl", "t_b", "asp"), "k": ("cl", "k_b", "asp"),
    "b": ("vcl", "b_b"), "d": ("vcl", "d_b"), "g": ("vcl", "g_b"),
    "ch": ("cl", "t_b", "sh"), "jh": ("vcl", "d_b", "zh"),
}
_DIPHTHONGS = {
    "ey": (("eh", 0.07), ("iy", 0.06)), "ay": (("aa", 0.09), ("iy", 0.06)),
    "ow": (("ao", 0.08), ("uw", 0.06)), "aw": (("aa", 0.09), ("uw", 0.06)),
    "oy": (("ao", 0.08), ("iy", 0.06)),
}
# phone "symbols" of the spelling rules; stops and diphthongs are expanded afterwards
_EXCEPTIONS = {
    "the": "dh ax", "a": "ax", "an": "ae n", "i": "ay", "you": "y uw", "to": "t uw",
    "do": "d uw", "of": "ax v", "is": "ih z", "was": "w ah z", "are": "aa r",
    "one": "w ah n", "two": "t uw", "three": "th r iy", "four": "f ao r", "five": "f ay v",
    "six": "s ih k s", "seven": "s eh v ax n", "eight": "ey t", "nine": "n ay n",
    "ten": "t eh n", "eleven": "ih l eh v ax n", "twelve": "t w eh l v", "zero": "z iy r ow",
    "they": "dh ey", "there": "dh eh r", "their": "dh eh r", "what": "w ah t",
    "who": "hh uw", "where": "w eh r", "here": "hh iy r", "some": "s ah m",
    "come": "k ah m", "done": "d ah n", "have": "hh ae v", "give": "g ih v",
    "live": "l ih v", "said": "s eh d", "says": "s eh z", "does": "d ah z",
    "okay": "ow k ey", "ok": "ow k ey", "yeah": "y eh ax", "yes": "y eh s",
    "mm-hm": "m hh m", "uh-huh": "ah hh ah", "hmm": "hh m", "mm": "m", "um": "ah m",
    "uh": "ah", "er": "er", "oh": "ow", "ah": "aa", "please": "p l iy z",
    "because": "b ih k ao z", "could": "k uh d", "would": "w uh d", "should": "sh uh d",
    "my": "m ay", "by": "b ay", "why": "w ay", "fly": "f l ay", "sky": "s k ay",
    "know": "n ow", "now": "n aw", "how": "hh aw", "wow": "w aw", "cow": "k aw",
    "be": "b iy", "he": "hh iy", "she": "sh iy", "we": "w iy", "me": "m iy",
    "go": "g ow", "so": "s ow", "no": "n ow", "hello": "hh ax l ow",
}
_LONG_VOWEL = {"a": "ey", "e": "iy", "i": "ay", "o": "ow", "u": "uw", "y": "ay"}
_RULES = [  # (spelling, symbols), longest first within each start letter
    ("tion", "sh ax n"), ("sion", "zh ax n"), ("igh", "ay"), ("tch", "ch"), ("dge", "jh"),
    ("sh", "sh"), ("ch", "ch"), ("th", "th"), ("ph", "f"), ("wh", "w"), ("ck", "k"),
    ("ng", "ng"), ("qu", "k w"), ("kn", "n"), ("wr", "r"), ("ee", "iy"), ("ea", "iy"),
    ("oo", "uw"), ("ou", "aw"), ("ow", "ow"), ("oi", "oy"), ("oy", "oy"), ("ai", "ey"),
    ("ay", "ey"), ("au", "ao"), ("aw", "ao"), ("ey", "ey"), ("ie", "iy"), ("ue", "uw"),
    ("ew", "uw"), ("oa", "ow"), ("er", "er"), ("ir", "er"), ("ur", "er"), ("ar", "aa r"),
    ("or", "ao r"),
]
_LETTERS = {
    "a": "ae", "b": "b", "c": "k", "d": "d", "e": "eh", "f": "f", "g": "g", "h": "hh",
    "i": "ih", "j": "jh", "k": "k", "l": "l", "m": "m", "n": "n", "o": "aa", "p": "p",
    "q": "k", "r": "r", "s": "s", "t": "t", "u": "ah", "v": "v", "w": "w", "x": "k s",
    "y": "y", "z": "z",
}
_DH_WORDS = {"this", "that", "these", "those", "then", "than", "them", "thus", "though", "with"}
FUNCTION_WORDS = frozenset((
    "the", "a", "an", "to", "of", "and", "in", "on", "at", "is", "it", "i", "you", "for",
    "that", "this", "with", "be", "are", "was", "as", "or", "but", "so", "my", "your",
    "me", "we", "do", "can", "what", "how", "if", "its", "it's", "our", "us", "he", "she",
    "they", "them", "his", "her", "am",
))
_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0..999 as English words ("twenty one")."""
    n = int(n)
    if not 0 <= n < 1000:
        raise ValueError(f"number_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def _spell(word: str) -> list[str]:
    w = word
    if w in _EXCEPTIONS:
        return _EXCEPTIONS[w].split()
    syms: list[str] = []
    # magic e: V C e at the end makes the vowel long and the e silent
    long_at = -1
    if len(w) >= 3 and w.endswith("e") and w[-2] not in _VOWELS and w[-3] in _VOWELS and (
        len(w) < 4 or w[-4] not in _VOWELS
    ):
        long_at, w = len(w) - 3, w[:-1]
    elif len(w) >= 3 and w.endswith("e") and w[-2] not in _VOWELS and w[-2] != "l":
        w = w[:-1]  # other final silent e
    i = 0
    while i < len(w):
        if i == long_at:
            syms.append(_LONG_VOWEL[w[i]])
            i += 1
            continue
        if w.startswith("th", i) and (w in _DH_WORDS or i > 0 and i + 2 < len(w) and w[i + 2] == "e"):
            syms.append("dh")
            i += 2
            continue
        for spelling, out in _RULES:
            if w.startswith(spelling, i) and not (spelling in ("kn", "wr") and i > 0):
                syms.extend(out.split())
                i += len(spelling)
                break
        else:
            c = w[i]
            nxt = w[i + 1] if i + 1 < len(w) else ""
            if i > 0 and c == w[i - 1] and c not in _VOWELS:
                i += 1  # doubled consonant
                continue
            if c == "c" and nxt in ("e", "i", "y"):
                syms.append("s")
            elif c == "y" and i > 0:
                syms.append("iy" if i == len(w) - 1 else "ih")
            elif c == "s" and 0 < i == len(w) - 1 and w[i - 1] not in "ptkf":
                syms.append("z")
            elif c in _LETTERS:
                syms.extend(_LETTERS[c].split())
            i += 1
    return syms


@functools.lru_cache(maxsize=8192)
def phonemize(word: str) -> tuple[tuple[str, float], ...]:
    """A word → ((phone, base duration in s), ...) by spelling rules and exceptions.

    Digits become number words; hyphenated words ("mm-hm") join their parts; characters
    other than letters, digits, apostrophes and hyphens are ignored.
    """
    word = word.lower()
    parts = [p for p in re.split(r"[-\s]+", word) if p]
    out: list[tuple[str, float]] = []
    for part in parts:
        if part.isdigit():
            for sub in number_words(int(part)).split():
                out.extend(phonemize(sub))
            continue
        part = re.sub(r"[^a-z]", "", part)
        for sym in _spell(part):
            if sym in _DIPHTHONGS:
                out.extend(_DIPHTHONGS[sym])
            elif sym in _STOPS:
                seq = _STOPS[sym]
                if not out:  # word-initial stop: no audible closure
                    seq = seq[1:]
                out.extend((p, PHONES[p].dur) for p in seq)
            elif sym in PHONES:
                out.append((sym, PHONES[sym].dur))
    if word in ("mm-hm", "uh-huh", "hmm", "mm", "um", "uh"):  # long, hummed fillers
        out = [(p, d * 2.2 if PHONES[p].voice > 0 else d) for p, d in out]
    # merge immediate repeats (e.g. "s" "s")
    merged: list[tuple[str, float]] = []
    for p, d in out:
        if merged and merged[-1][0] == p and p != "cl":
            merged[-1] = (p, merged[-1][1] + 0.5 * d)
        else:
            merged.append((p, d))
    if not merged:
        merged = [("ax", PHONES["ax"].dur)]
    return tuple(merged)


_TOKEN_RE = re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)*|[,.!?;:]")
_YES_NO = frozenset((
    "is", "are", "do", "does", "did", "can", "could", "will", "would", "should", "have",
    "has", "may", "shall", "am", "was", "were",
))


def tokenize(text: str | Sequence[str]) -> list[str]:
    """Text → lower-case words and punctuation tokens (``, . ! ? ; :``)."""
    if not isinstance(text, str):
        text = " ".join(text)
    return _TOKEN_RE.findall(text.lower())


# ---------------------------------------------------------------------------- filters

_FS_V = _FS / 2  # the voiced part is synthesised at 8 kHz (formants F1-F3 < 4 kHz)

try:  # lfilter's Python wrapper costs more than filtering a short segment; call the core
    from scipy.signal._sigtools import _linear_filter as _raw_lfilter

    def _lfilter(b, a, x):
        return _raw_lfilter(b, a, x, -1)

    _chk = np.linspace(-1, 1, 64, dtype=np.float32)
    _bb, _aa = np.array([0.5], np.float32), np.array([1.0, -0.5], np.float32)
    if not np.array_equal(_lfilter(_bb, _aa, _chk), _signal.lfilter(_bb, _aa, _chk)):
        raise ImportError("scipy internals changed")
except Exception:  # pragma: no cover - other scipy versions
    def _lfilter(b, a, x):
        return _signal.lfilter(b, a, x)


def _glottal_pole(open_quotient: float) -> float:
    """Pole of the 2-pole glottal low-pass at 8 kHz: a larger open quotient is softer."""
    return float(np.clip(0.86 + 0.2 * (open_quotient - 0.5), 0.8, 0.95))


@functools.lru_cache(maxsize=32768)
def _voiced_filter(pid: int, scale: float, pole: float) -> tuple[np.ndarray, np.ndarray]:
    """Glottal source shaping and vocal tract of one phone as one float32 (b, a) at 8 kHz.

    Impulses → 2-pole glottal low-pass (double pole ``pole``) → lip radiation (first
    difference) → three Klatt formant resonators in cascade (unit gain at DC). The source
    part is normalised to unit gain at 300 Hz.
    """
    spec = PHONES[_PHONE_NAMES[pid]]
    a = np.array([1.0, -2.0 * pole, pole * pole])
    w = 2.0 * np.pi * 300.0 / _FS_V
    z1 = np.exp(-1j * w)
    gain = 1.0 / abs((1.0 - z1) / (1.0 - pole * z1) ** 2)
    for f, b in zip(spec.formants, spec.bw):
        f = min(f * scale, 0.45 * _FS_V)
        r = np.exp(-np.pi * b / _FS_V)
        c1 = 2.0 * r * np.cos(2.0 * np.pi * f / _FS_V)
        c2 = -r * r
        gain *= 1.0 - c1 - c2
        a = np.convolve(a, [1.0, -c1, -c2])
    gain *= _VOICED_GAIN
    return np.array([gain, -gain], np.float32), a.astype(np.float32)


_NOISE_KEYS = tuple(_NOISE_BANDS)


@functools.lru_cache(maxsize=1)
def _noise_tables() -> np.ndarray:
    """float32 [K, L] band-passed unit-RMS noise, one row per _NOISE_KEYS (fixed seed)."""
    rng = np.random.default_rng(20240607)
    white = rng.standard_normal(_NOISE_TABLE_LEN + 2048)
    rows = []
    for key in _NOISE_KEYS:
        sos = _signal.butter(2, _NOISE_BANDS[key], btype="bandpass", fs=_FS, output="sos")
        x = _signal.sosfilt(sos, white)[2048:]
        rows.append(x / np.sqrt(np.mean(x * x)))
    return np.stack(rows).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _noise_rows() -> list[np.ndarray]:
    return list(_noise_tables())


@functools.lru_cache(maxsize=1024)
def _ramp(n: int, down: bool = False) -> np.ndarray:
    """Linear float32 ramp 0→1 (or 1→0) of n samples; up + down of equal n sum to 1."""
    r = ((np.arange(n) + 0.5) / n).astype(np.float32)
    return r[::-1].copy() if down else r


_UNIT = np.ones(1 << 16, np.float32)


@functools.lru_cache(maxsize=64)
def _burst_env(pid: int) -> np.ndarray:
    """Amplitude × envelope of a stop burst (1 ms attack, 8 ms decay), sliced per length."""
    t = np.arange(4096)
    env = np.exp(-t / 128.0) * np.minimum(1.0, (t + 0.5) / 16.0)
    return (env * PHONES[_PHONE_NAMES[pid]].noise_amp).astype(np.float32)


_PHONE_NAMES = tuple(PHONES)
_PID = {p: i for i, p in enumerate(_PHONE_NAMES)}
_PAU = _PID["pau"]
_P_VOICE = [PHONES[p].voice for p in _PHONE_NAMES]
_P_NOISE = [_NOISE_KEYS.index(PHONES[p].noise) if PHONES[p].noise else -1 for p in _PHONE_NAMES]
_P_NOISE_AMP = [np.float32(PHONES[p].noise_amp) for p in _PHONE_NAMES]
_P_BURST = [PHONES[p].burst for p in _PHONE_NAMES]
_STRESSABLE = {_PID[v] for v in ("iy", "ih", "eh", "ae", "aa", "ao", "uh", "uw", "ah", "er")}


@functools.lru_cache(maxsize=8192)
def _word_phones(word: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Phone ids and base durations (s) of a word, with lexical stress and reduction."""
    ph = phonemize(word)
    ids = tuple(_PID[p] for p, _ in ph)
    durs = [d for _, d in ph]
    if word in FUNCTION_WORDS:
        durs = [d * 0.75 for d in durs]
    elif len(ph) > 3:
        for k, i in enumerate(ids):
            if i in _STRESSABLE:
                durs[k] *= 1.25
                break
    return ids, tuple(durs)


# ---------------------------------------------------------------------------- synthesis

_LEAD = 0.015      # silence before the first word (s)
_TAIL = 0.06       # silence after the last word (s)
_RING = 120        # 8 kHz zero samples after each filtered region: the resonators ring out (15 ms)
_XFADE = 48        # 8 kHz half-length of the excitation cross-fade between phones (6 ms)
_VOICED_GAIN = 5.0   # calibrates voiced against noise (vowels ~10 dB above /s/)
_PUNCT = frozenset(",;:.!?")
_END_SHAPE = {"rise": 0.8, "continue": 0.15, "fall": -0.45}


def _plan(tokens: list[str], voice: Voice, u: np.ndarray, intonation: str):
    """Phone ids, 16 kHz phone boundaries, per-phone gains, word spans, pitch points.

    ``u`` holds enough uniform random numbers (the caller draws them in one call).
    Plain Python: the lists are short, and numpy calls on tiny arrays cost more.
    """
    rate = max(0.3, voice.rate)
    f0, rf = voice.f0, voice.pitch_range
    uu = u.tolist()
    ui = 0
    # phrases: (words, closing punctuation)
    phrases: list[tuple[list[str], str]] = []
    cur: list[str] = []
    for tok in tokens:
        if tok in _PUNCT:
            if cur:
                phrases.append((cur, tok))
                cur = []
        else:
            cur.append(tok)
    if cur:
        phrases.append((cur, ""))
    ids: list[int] = [_PAU]
    lens: list[int] = [int(round(_LEAD * _FS))]
    gains: list[float] = [0.0]
    words: list[tuple[str, int, int]] = []
    pt: list[float] = []
    pf: list[float] = []
    t = lens[0]
    for k, (ws, punct) in enumerate(phrases):
        if punct in (",", ";", ":"):
            shape = "continue"
        elif punct == "?":
            shape = "rise" if ws[0] in _YES_NO else "fall"
        else:
            shape = "fall"
        if k == len(phrases) - 1 and intonation != "auto":
            shape = intonation
        p_start = t
        spans = []
        for j, word in enumerate(ws):
            final = j == len(ws) - 1
            func = word in FUNCTION_WORDS
            w_ids, w_durs = _word_phones(word)
            g = (0.85 if func else 1.0 + 0.15 * uu[ui]) * (0.9 if final else 1.0)
            ui += 1
            m = (1.3 if final else 1.0) / rate * _FS
            w_start = t
            for pid, d in zip(w_ids, w_durs):
                n = int(d * m * (0.85 + 0.3 * uu[ui]))
                ui += 1
                n = max(16, n)
                ids.append(pid)
                lens.append(n)
                gains.append(g)
                t += n
            words.append((word, w_start, t))
            spans.append((w_start, t, func))
            if final:
                if k == len(phrases) - 1:
                    gap = _TAIL * rate
                elif punct in (",", ";", ":"):
                    gap = 0.12 + 0.1 * uu[ui]
                else:
                    gap = 0.25 + 0.15 * uu[ui]
            else:
                gap = 0.04 * uu[ui]
            ui += 1
            n = max(16, int(gap / rate * _FS))
            ids.append(_PAU)
            lens.append(n)
            gains.append(0.0)
            t_end_word = t
            t += n
        # pitch points: declination over the phrase, accents, phrase-final shape
        p_len = max(t_end_word - p_start, 1)
        for a, b, func in spans:
            mid = (a + b) // 2
            pt += [a, mid]
            acc = 0.0 if func else rf * (0.2 + 0.4 * uu[ui])
            ui += 1
            pf += [f0 * (1.0 + rf * (0.25 - 0.45 * (a - p_start) / p_len)),
                   f0 * (1.0 + rf * (0.25 - 0.45 * (mid - p_start) / p_len)) * (1.0 + acc)]
        pt.append(t_end_word)
        pf.append(f0 * (1.0 + _END_SHAPE[shape] * rf))
    return ids, lens, gains, words, pt, pf, ui


def _count_draws(tokens: list[str]) -> int:
    """Uniform draws that _plan (3 + phones per word) and the pitch wander (<= 3 per
    word) use, with room to spare."""
    n = 0
    for tok in tokens:
        if tok not in _PUNCT:
            n += 7 + len(_word_phones(tok)[0])
    return n


def _synth_builtin(tokens: list[str], voice: Voice, seed: int, intonation: str,
                   peak: float) -> Speech:
    rng = np.random.default_rng((int(seed) % (1 << 62)) ^ 0x5EED0A0D10)
    u = rng.random(_count_draws(tokens))
    ids, lens, gains, words, pt, pf, ui = _plan(tokens, voice, u, intonation)
    n_seq = len(ids)
    u2 = rng.random(n_seq + 2)  # noise offsets per phone, pitch phase, breath offset
    bounds = np.zeros(n_seq + 1, np.int64)
    np.cumsum(lens, out=bounds[1:])
    n = int(bounds[-1])
    n2 = n // 2 + 1
    voiced = [_P_VOICE[i] * g for i, g in zip(ids, gains)]

    # --- glottal pulse instants (8 kHz samples) from the pitch contour, control rate 5 ms
    step = 40
    tc = np.arange(0, n2 + step, step, dtype=np.float64)
    pt_a = np.asarray(pt, np.float64) * 0.5
    pf_a = np.asarray(pf) * (1.0 + 0.03 * (u[ui:ui + len(pf)] * 2.0 - 1.0) * 1.7)
    f0c = np.interp(tc, pt_a, pf_a)
    phase = np.cumsum(f0c * (step / _FS_V))
    phase += u2[-1] - phase[0]
    tk = np.interp(np.arange(np.ceil(phase[0]), phase[-1]), phase, tc)
    normal = rng.standard_normal((2, len(tk)))
    tk += (0.5 * voice.jitter * _FS_V) / np.interp(tk, tc, f0c) * normal[0]
    # voicing envelope at the pulses: flat inside each phone, short ramps between phones
    b8 = bounds // 2
    s8, e8 = b8[:-1], b8[1:]
    r = np.minimum((e8 - s8) // 4, 64)
    r[np.asarray(ids) == _PAU] = 0  # voicing starts and stops inside the words
    env_x = np.empty(2 * n_seq)
    env_x[0::2] = s8 + r
    env_x[1::2] = e8 - r
    amp = np.interp(tk, env_x, np.repeat(voiced, 2))
    amp *= 1.0 + voice.shimmer * normal[1]
    keep = (amp > 1e-3) & (tk > 0) & (tk < n2 - 1)
    exc = np.zeros(n2 + 2, np.float32)
    pos = (tk[keep] + 0.5).astype(np.int64)
    exc[pos] = amp[keep]
    if voice.breathiness > 0 and len(pos):
        # breath: small impulses of random amplitude spread over each open phase
        spread = _FS_V / voice.f0 * voice.open_quotient
        at = (np.arange(1, 7) * (spread / 7)).astype(np.int64)
        bpos = (pos[:, None] + at).ravel()
        nb = len(bpos)
        off = int(u2[-2] * (_NOISE_TABLE_LEN - nb - 1)) if nb < _NOISE_TABLE_LEN else 0
        bval = _noise_tables()[_NOISE_KEYS.index("asp"), off:off + nb] * (0.4 * voice.breathiness)
        bval = bval[:nb] * np.repeat(amp[keep], len(at))[: len(bval)]
        np.add.at(exc, np.minimum(bpos[: len(bval)], n2 + 1), bval.astype(np.float32))

    # --- voiced part: one filter per distinct phone over its concatenated regions
    out8 = np.zeros(n2 + _RING, np.float32)
    vidx = [i for i, v in enumerate(voiced) if v > 0]
    if vidx:
        s8l, e8l = s8.tolist(), e8.tolist()
        seg = [e - s for s, e in zip(s8l, e8l)]
        vidx.sort(key=lambda i: ids[i])
        xs, ws, los, ms, groups = [], [], [], [], []
        ring = np.zeros(_RING, np.float32)
        prev_pid, g_start, total = -1, 0, 0
        for i in vidx:
            h = seg[i] // 2
            ol = min(_XFADE, h, seg[i - 1] // 2)
            orr = min(_XFADE, h, seg[i + 1] // 2 if i + 1 < n_seq else 0)
            lo, hi = s8l[i] - ol, e8l[i] + orr
            xs += (exc[lo:hi], ring)
            if ol:
                ws.append(_ramp(2 * ol))
            ws.append(_UNIT[: hi - lo - 2 * ol - 2 * orr])
            if orr:
                ws.append(_ramp(2 * orr, True))
            ws.append(ring)
            m = hi - lo + _RING
            if ids[i] != prev_pid:
                if prev_pid >= 0:
                    groups.append((prev_pid, g_start, total))
                prev_pid, g_start = ids[i], total
            los.append(lo)
            ms.append(m)
            total += m
        groups.append((prev_pid, g_start, total))
        xcat = np.concatenate(xs)
        xcat *= np.concatenate(ws)
        ycat = np.empty_like(xcat)
        # quantised so that filters are shared between similar voices (cache hits)
        scale = round(voice.formant_scale, 2)
        pole = round(_glottal_pole(voice.open_quotient), 2)
        for pid, g0, g1 in groups:
            b, a = _voiced_filter(pid, scale, pole)
            ycat[g0:g1] = _lfilter(b, a, xcat[g0:g1])
        p0 = 0
        for lo, m in zip(los, ms):
            out8[lo:lo + m] += ycat[p0:p0 + m]
            p0 += m
    # 8 → 16 kHz by linear interpolation
    out = np.empty(2 * len(out8), np.float32)
    out[0::2] = out8
    odd = out[1:-1:2]
    np.add(out8[:-1], out8[1:], out=odd)
    odd *= 0.5
    out[-1] = 0.5 * out8[-1]
    out = out[:n]

    # --- noise part: fricatives, bursts, aspiration (16 kHz)
    bl = bounds.tolist()
    span = _NOISE_TABLE_LEN - 4096
    rows = None
    uu = u2[:n_seq].tolist()
    for i, pid in enumerate(ids):
        key = _P_NOISE[pid]
        if key < 0:
            continue
        if rows is None:
            rows = _noise_rows()
        lo, hi = bl[i], bl[i + 1]
        off = int(uu[i] * span)
        m = hi - lo
        if _P_BURST[pid]:
            out[lo:hi] += _burst_env(pid)[:m] * rows[key][off:off + m]
        else:
            seg = rows[key][off:off + m] * _P_NOISE_AMP[pid]
            rr = min(m // 3, 240)
            seg[:rr] *= _ramp(rr)
            seg[m - rr:] *= _ramp(rr, True)
            out[lo:hi] += seg
    top = max(float(out.max()), -float(out.min()))
    if top > 0:
        out *= np.float32(peak / top)
    word_times = tuple((w, a / _FS, b / _FS) for w, a, b in words)
    return Speech(out, word_times)


# ---------------------------------------------------------------------------- espeak


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _synth_espeak(tokens: list[str], voice: Voice, seed: int, peak: float) -> Speech:
    """One espeak-ng call per word (exact word times), resampled to 16 kHz."""
    import io

    import soundfile as sf

    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xE5])
    wpm = int(175 * voice.rate)
    pitch = int(np.clip((voice.f0 - 80) / 2, 0, 99))
    chunks, words, t = [np.zeros(int(_LEAD * _FS))], [], int(_LEAD * _FS)
    for tok in tokens:
        if tok in ",;:.!?":
            gap = int(rng.uniform(0.15, 0.35) * _FS)
            chunks.append(np.zeros(gap))
            t += gap
            continue
        wav = subprocess.run(["espeak-ng", "--stdout", "-s", str(wpm), "-p", str(pitch), tok],
                             capture_output=True, check=True).stdout
        x, sr = sf.read(io.BytesIO(wav), dtype="float64")
        if x.ndim > 1:
            x = x.mean(axis=1)
        if sr != SAMPLE_RATE:
            from math import gcd
            g = gcd(sr, SAMPLE_RATE)
            x = _signal.resample_poly(x, SAMPLE_RATE // g, sr // g)
        nz = np.flatnonzero(np.abs(x) > 1e-3 * max(np.abs(x).max(), 1e-9))
        x = x[nz[0]: nz[-1] + 1] if len(nz) else x[:1]
        words.append((tok, t / _FS, (t + len(x)) / _FS))
        gap = int(rng.uniform(0.0, 0.04) * _FS)
        chunks += [x, np.zeros(gap)]
        t += len(x) + gap
    chunks.append(np.zeros(int(_TAIL * _FS)))
    out = np.concatenate(chunks)
    top = np.abs(out).max()
    if top > 0:
        out *= peak / top
    return Speech(out.astype(np.float32), tuple(words))


# ---------------------------------------------------------------------------- API


def synthesize(
    text: str | Sequence[str],
    voice: Voice | None = None,
    seed: int = 0,
    *,
    intonation: str = "auto",
    peak: float = 0.5,
    backend: str = "builtin",
) -> Speech:
    """Synthesise ``text`` (words and optional punctuation) at 16 kHz.

    Args:
        text: a string or a sequence of words. Punctuation shapes the prosody: ``,``
            (short pause, continuation rise), ``.``/``!`` (fall, longer pause), ``?``
            (rise for yes/no questions).
        voice: speaker parameters (default ``Voice()``).
        seed: randomness of durations, pitch wander, jitter and noise; same
            (text, voice, seed, options) → bitwise identical output.
        intonation: ``"auto"`` (from punctuation, statements fall), or force the end of the
            utterance to ``"fall"``, ``"rise"`` or ``"continue"`` (e.g. before a mid-sentence
            pause).
        peak: peak absolute amplitude of the result.
        backend: ``"builtin"`` (default) or ``"espeak"`` (needs ``espeak-ng`` on PATH).

    Returns:
        :class:`Speech` with float32 audio (15 ms of silence before the first word, 60 ms
        after the last) and ``(word, start, end)`` times in seconds.
    """
    voice = voice or Voice()
    if intonation not in ("auto", "fall", "rise", "continue"):
        raise ValueError(f"intonation must be auto/fall/rise/continue, got {intonation!r}")
    tokens = tokenize(text)
    if not any(t not in ",;:.!?" for t in tokens):
        raise ValueError(f"nothing to say in {text!r}")
    if backend == "builtin":
        return _synth_builtin(tokens, voice, seed, intonation, peak)
    if backend == "espeak":
        if not espeak_available():
            raise RuntimeError("backend='espeak' needs espeak-ng on PATH")
        return _synth_espeak(tokens, voice, seed, peak)
    raise ValueError(f"backend must be 'builtin' or 'espeak', got {backend!r}")


_BENCH_SENTENCES = (
    "can you tell me what time the store opens tomorrow morning?",
    "it opens at nine, and it closes at six in the evening.",
    "i went to the market this morning and they had fresh strawberries.",
    "sure, let me check the weather in paris for you.",
    "when i say banana, you say go.",
    "watch the red ball and count how many times it bounces.",
)


def benchmark(seconds: float = 2.0, seed: int = 0) -> dict:
    """Synthesise varied sentences for ~``seconds`` of wall time on this core.

    Returns seconds of audio produced per second of wall time (``realtime_factor``) and per
    second of this process's CPU time (``cpu_realtime_factor``; less sensitive to other
    load on the machine). Utterance audio includes the short pauses between words and
    phrases, not conversation-level silences.
    """
    _noise_tables()
    voices = [Voice.from_seed(i) for i in range(8)] + [MODEL_VOICE]
    audio = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    i = 0
    while time.perf_counter() - t0 < seconds:
        sp = synthesize(_BENCH_SENTENCES[i % len(_BENCH_SENTENCES)], voices[i % len(voices)], seed + i)
        audio += sp.duration
        i += 1
    wall = time.perf_counter() - t0
    cpu = max(time.process_time() - c0, 1e-9)
    return {"audio_seconds": audio, "wall_seconds": wall, "cpu_seconds": cpu,
            "realtime_factor": audio / wall, "cpu_realtime_factor": audio / cpu,
            "utterances": i}
