"""The synthetic interaction corpus: two-party conversations that teach *when* to speak.

Every conversation is built on a timeline from a small built-in vocabulary and sentence
templates, voiced by :mod:`tml.data_pipelines.synth_speech` (a different random voice for
the user and for background speakers, one fixed voice for the model), and returned as a
:class:`tml.stream.Conversation`:

* ``user_audio``: everything the model hears — the user, background speakers (quieter,
  muffled, different voice) and a low noise floor;
* ``model_audio``: the model's own speech target only (exact zeros when it is silent);
* ``words``: time-aligned words of every speaker (``user``, ``model``, ``other``);
* ``events``: the targets and inputs besides speech — ``model_text`` (the transcript of
  the model's speech, one event per 200 ms micro-turn holding the words that start in it,
  each followed by a space so that concatenating the micro-turns' texts gives the
  transcript), ``backchannel`` and ``delegate`` control events, ``typed`` and
  ``background`` inputs;
* ``video`` (``rep_count`` only): uint8 [F, 80, 80, 3] at 10 fps;
* ``meta``: the scenario's facts (see :data:`META_KEYS`), JSON-ready.

Common ``meta`` keys of every scenario:

* ``utterances``: ``[[speaker, start, end, text], ...]`` (after any cut);
* ``model_speech``: ``[[start, end], ...]`` spans where the model speaks;
* ``must_stay_silent``: ``[[start, end], ...]`` spans where the model must not speak
  (the user's speech, a mid-sentence pause, background speech, waiting for a time or a
  result ...). By construction the model channel is silent there; evaluations check a
  trained model against the same spans.

Conversations are 4-20 s long; ``make_conversation(scenario, seed, index)`` is a pure
function of its arguments (bitwise identical arrays on every call), and
``make_corpus(n, seed)`` cycles over :data:`SCENARIOS` deterministically.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.signal as _signal
from tml.data_pipelines.synth_speech import (
    MODEL_VOICE,
    Voice,
    number_words,
    synthesize,
    tokenize,
)

from tml.stream.conversation import (
    MICRO_TURN_SECONDS,
    SAMPLE_RATE,
    VIDEO_FPS,
    Conversation,
    Event,
    Word,
)

__all__ = [
    "SCENARIOS",
    "META_KEYS",
    "make_conversation",
    "make_corpus",
    "count_repetitions",
    "MIN_SECONDS",
    "MAX_SECONDS",
    "VIDEO_SIZE",
]

MIN_SECONDS = 4.0
MAX_SECONDS = 20.0
VIDEO_SIZE = (80, 80)  # H, W: 2 x 2 hMLP patches of 40 x 40
PEAK_LIMIT = 0.9
_SR = SAMPLE_RATE

META_KEYS: dict[str, tuple[str, ...]] = {
    "turn_taking": ("response_gaps", "turn_ends"),
    "mid_pause": ("pause", "filler", "turn_end", "response_start"),
    "backchannel": ("backchannels", "turn_end", "response_start"),
    "interruption": ("interrupt_time", "model_stop_time", "stop_delay", "cut_text",
                     "turn_end", "response_start"),
    "cue_speak": ("cue_word", "cue_response", "cues", "responses", "response_delays"),
    "time_speak": ("delay_seconds", "target_word", "request_end", "target_time",
                   "response_start"),
    "background_speech": ("other_spans", "other_level_db"),
    "rep_count": ("expected_count", "motion", "period", "motion_kind", "axis",
                  "question_first", "answer_start"),
    "typed_text": ("typed_text", "typed_time", "expected_answer", "response_start"),
    "delegate": ("delegate_request", "delegate_time", "result_text", "result_time",
                 "answer_start"),
}
"""Scenario-specific ``meta`` keys (besides ``utterances``, ``model_speech``,
``must_stay_silent``). Times are seconds from the start of the conversation."""

SCENARIOS: tuple[str, ...] = tuple(META_KEYS)
"""Scenario names, in the order :func:`make_corpus` cycles through them."""

# ------------------------------------------------------------------------- vocabulary

_QA = (
    ("what time does the store open?", "it opens at nine in the morning."),
    ("can you tell me a fun fact?", "octopuses have three hearts."),
    ("how is the weather today?", "it looks sunny and warm all day."),
    ("what should i cook for dinner?", "how about pasta with tomato sauce?"),
    ("do you like music?", "yes, i enjoy many kinds of music."),
    ("where is the nearest park?", "there is one two blocks to the north."),
    ("how do i say hello in french?", "you say bonjour."),
    ("what is the capital of italy?", "the capital of italy is rome."),
    ("how long should i boil an egg?", "about eight to ten minutes."),
    ("what is a good name for a cat?", "how about pepper, or maybe mochi?"),
    ("can you recommend a book?", "try the hobbit, it is a classic."),
    ("why is the sky blue?", "sunlight scatters more at short blue wavelengths."),
    ("how many legs does a spider have?", "a spider has eight legs."),
    ("what is the tallest animal?", "the giraffe is the tallest animal."),
    ("should i take an umbrella?", "yes, it may rain this afternoon."),
    ("what rhymes with cat?", "hat, bat and mat all rhyme with cat."),
    ("what is the biggest planet?", "jupiter is the biggest planet."),
    ("how do plants make food?", "they use sunlight, water and air."),
)
_THANKS = ("thanks.", "great, thank you.", "okay, that helps.", "cool, thanks a lot.")
_WELCOME = ("you are welcome.", "happy to help.", "any time.")
_PREFIXES = ("so i wanted to ask you", "okay so my question is", "i was wondering",
             "hey, quick question,", "let me think, i want to know", "so tell me")
_FILLERS = ("um", "uh", "hmm", "er")
_STORIES = (
    (("i went to the market this morning,", "and they had fresh strawberries,",
      "so i bought two big boxes,", "and then i made a cake with them."),
     ("that sounds lovely.", "wow, i bet it was delicious.")),
    (("my neighbour has a new puppy,", "it barks at every bird,", "and yesterday it ran away,",
      "but we found it in the park."),
     ("i am glad you found it.", "what a lucky puppy.")),
    (("i started learning the piano,", "my teacher is very patient,",
      "we practise every tuesday,", "and now i can play a short song."),
     ("that is great progress.", "nice, keep it up.")),
    (("the train was late again today,", "so i waited for half an hour,",
      "then it was completely full,", "and i had to stand the whole way."),
     ("oh no, that sounds tiring.", "what an annoying trip.")),
    (("we painted the kitchen last weekend,", "we chose a light green colour,",
      "it took us two whole days,", "but it looks much brighter now."),
     ("that sounds like a nice change.", "good job, it must look great.")),
)
_BACKCHANNELS = ("mm-hm", "yeah", "uh-huh", "right", "okay", "i see")
_TOPICS = (
    ("tell me about the solar system.",
     "the solar system has eight planets. the biggest one is jupiter, and the smallest "
     "one is mercury. earth is the third planet from the sun.",
     "wait, which planet has rings?", "saturn has the most famous rings."),
    ("how do bees make honey?",
     "bees collect nectar from flowers and carry it back to the hive. then they pass it "
     "from bee to bee and fan it with their wings until it gets thick.",
     "sorry, how many flowers is that?", "a lot, millions of flowers for one jar."),
    ("can you explain how rain forms?",
     "the sun warms the water in lakes and seas, and it rises as vapour. high up it cools "
     "down and forms clouds, and the drops fall back as rain.",
     "hold on, why does it cool down?", "the air is colder higher up."),
    ("what can i do in paris?",
     "you can visit the eiffel tower and walk along the river. there are also many "
     "museums, and the bakeries are wonderful in the morning.",
     "wait, which museum is the best?", "many people love the louvre."),
)
_CATEGORIES = (
    ("apple", "pear", "plum", "grape", "lemon", "mango", "cherry", "banana", "peach", "melon"),
    ("red", "blue", "green", "yellow", "orange", "pink", "purple", "brown", "white", "black"),
    ("cat", "dog", "horse", "tiger", "lion", "zebra", "rabbit", "mouse", "eagle", "shark"),
)
_CUE_RESPONSES = ("go", "stop", "now", "bingo", "jump", "yes", "beep")
_ACKS = ("okay.", "got it.", "sure.", "okay, ready.")
_TIME_WORDS = ("go", "now", "hello", "done", "time", "beep", "ready")
_TIME_TEMPLATES = ("in {d} seconds, say {w}.", "say {w} in {d} seconds.",
                   "wait {d} seconds, then say {w}.", "please say {w} in {d} seconds.")
_BACKGROUND = ("honey, did you see my keys?", "the bus is late again.",
               "i will be back in ten minutes.", "can you pass me the salt?",
               "what time is the meeting?", "turn the oven off please.",
               "where did i put my phone?", "dinner is almost ready.")
_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (235, 210, 40), "white": (240, 240, 240), "orange": (245, 140, 30)}
_BACKDROPS = ((20, 20, 30), (60, 60, 70), (200, 200, 190), (120, 150, 170), (30, 60, 40))
_CITIES = ("paris", "london", "tokyo", "berlin", "madrid", "rome", "oslo", "lima")
_CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy")


# ------------------------------------------------------------------------- timeline


@dataclass
class _Utt:
    speaker: str
    start: int               # first sample in the conversation
    audio: np.ndarray
    words: list[Word]
    text: str

    @property
    def t0(self) -> float:
        return self.words[0].start

    @property
    def t1(self) -> float:
        return self.words[-1].end


def _scenario_rng(scenario: str, seed: int, index: int, attempt: int) -> np.random.Generator:
    mask = (1 << 64) - 1
    return np.random.default_rng(
        [int(seed) & mask, int(index) & mask, zlib.crc32(scenario.encode()), attempt])


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _next_boundary(t: float, margin: float = 0.0) -> float:
    """First micro-turn boundary at or after t + margin."""
    return math.ceil((t + margin) / MICRO_TURN_SECONDS - 1e-9) * MICRO_TURN_SECONDS


def _merge(spans: list[list[float]]) -> list[list[float]]:
    """Sorted union of intervals (touching intervals are joined)."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1e-6:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _subtract(spans: list[list[float]], holes: list[list[float]]) -> list[list[float]]:
    """Intervals ``spans`` minus the union of ``holes``."""
    out = []
    for a, b in spans:
        pieces = [[a, b]]
        for h0, h1 in holes:
            nxt = []
            for p0, p1 in pieces:
                if h1 <= p0 or h0 >= p1:
                    nxt.append([p0, p1])
                    continue
                if h0 > p0:
                    nxt.append([p0, h0])
                if h1 < p1:
                    nxt.append([h1, p1])
            pieces = nxt
        out += [p for p in pieces if p[1] - p[0] > 1e-6]
    return out


class _Scene:
    """Places synthesised utterances, events and facts on a timeline."""

    def __init__(self, scenario: str, seed: int, index: int, attempt: int = 0):
        self.scenario, self.seed, self.index = scenario, int(seed), int(index)
        self.rng = _scenario_rng(scenario, seed, index, attempt)
        rng = self.rng
        user_seed, other_seed = (int(x) for x in rng.integers(0, 1 << 31, 2))
        self.voices = {"user": Voice.from_seed(user_seed), "model": MODEL_VOICE,
                       "other": Voice.from_seed(other_seed ^ 0x5A5A5A)}
        user_peak = float(rng.uniform(0.35, 0.7))
        self.other_db = float(rng.uniform(-16.0, -9.0))
        self.peaks = {"user": user_peak, "model": 0.5,
                      "other": user_peak * 10 ** (self.other_db / 20)}
        self.utts: list[_Utt] = []
        self.events: list[Event] = []
        self.silent: list[list[float]] = []
        self.meta: dict = {}
        self.video: np.ndarray | None = None
        self.end_pad = float(rng.uniform(0.4, 1.0))

    # -- building blocks
    def say(self, speaker: str, text: str, at: float, intonation: str = "auto") -> _Utt:
        """Synthesise ``text`` so that its first word starts at time ``at`` (s)."""
        sp = synthesize(text, self.voices[speaker], int(self.rng.integers(1 << 31)),
                        intonation=intonation, peak=self.peaks[speaker])
        audio = sp.audio
        if speaker == "other":  # farther away: muffled by a one-pole low-pass
            audio = _signal.lfilter([0.45], [1.0, -0.55], audio).astype(np.float32)
        lead = int(round(sp.words[0][1] * _SR))
        start = max(0, int(round(at * _SR)) - lead)
        words = [Word(w, (start + int(round(a * _SR))) / _SR, (start + int(round(b * _SR))) / _SR,
                      speaker) for w, a, b in sp.words]
        utt = _Utt(speaker, start, audio, words, text)
        self.utts.append(utt)
        return utt

    def cut(self, utt: _Utt, stop: float) -> str:
        """Stop ``utt`` at time ``stop`` (10 ms fade-out); returns the text left unsaid."""
        n = max(0, int(round(stop * _SR)) - utt.start)
        audio = utt.audio[:n].copy()
        fade = min(160, n)
        if fade:
            audio[n - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        kept = [w for w in utt.words if w.start < stop]  # a word begun is kept, truncated
        unsaid = [w.text for w in utt.words if w.start >= stop]
        utt.words = [Word(w.text, w.start, min(w.end, stop), w.speaker) for w in kept]
        utt.audio = audio
        return " ".join(unsaid)

    def must_stay_silent(self, t0: float, t1: float) -> None:
        if t1 > t0:
            self.silent.append([float(t0), float(t1)])

    def silent_during(self, *utts: _Utt) -> None:
        for u in utts:
            self.must_stay_silent(u.t0, u.t1)

    def event(self, time: float, kind: str, text: str = "") -> None:
        self.events.append(Event(float(time), kind, text))

    @property
    def end(self) -> float:
        return max((u.t1 for u in self.utts), default=0.0)

    # -- the conversation
    def finish(self) -> Conversation | None:
        """The conversation, or None if it came out longer than MAX_SECONDS."""
        rng = self.rng
        duration = max(MIN_SECONDS, self.end + self.end_pad)
        if duration > MAX_SECONDS:
            return None
        n = int(round(duration * _SR))
        user = _noise_floor(n, float(rng.uniform(2e-4, 1.5e-3)), int(rng.integers(1 << 30)))
        model = np.zeros(n, np.float32)
        for u in self.utts:
            dst = model if u.speaker == "model" else user
            m = min(len(u.audio), n - u.start)
            if m > 0:
                dst[u.start:u.start + m] += u.audio[:m]
        peak = float(np.abs(user).max())
        if peak > PEAK_LIMIT:
            user *= np.float32(PEAK_LIMIT / peak)
        words = sorted((w for u in self.utts for w in u.words), key=lambda w: (w.start, w.speaker))
        model_words = [w for w in words if w.speaker == "model"]
        events = list(self.events) + _model_text_events(model_words)
        events.sort(key=lambda e: (e.time, e.kind))
        meta = {
            "utterances": [[u.speaker, u.t0, u.t1, " ".join(w.text for w in u.words)]
                           for u in sorted(self.utts, key=lambda u: u.t0) if u.words],
            "model_speech": [[u.t0, u.t1] for u in sorted(self.utts, key=lambda u: u.t0)
                             if u.speaker == "model" and u.words],
            "must_stay_silent": _merge(self.silent),
            **self.meta,
        }
        video = self.video
        if video is not None:  # exactly ceil(duration * fps) frames
            frames = -(-n // (_SR // VIDEO_FPS))
            if len(video) < frames:
                video = np.concatenate([video, np.repeat(video[-1:], frames - len(video), 0)])
            video = video[:frames]
        conv = Conversation(
            id=f"synth-{self.scenario}-s{self.seed}-{self.index:07d}",
            scenario=self.scenario,
            user_audio=user,
            model_audio=model,
            words=words,
            events=events,
            video=video,
            meta=meta,
        )
        conv.validate()
        return conv


def _model_text_events(model_words: list[Word]) -> list[Event]:
    """One model_text event per micro-turn: the words that start in it, space-terminated."""
    events: list[Event] = []
    cur_turn, cur_words, cur_time = None, [], 0.0
    for w in model_words:
        turn = int(math.floor(w.start / MICRO_TURN_SECONDS + 1e-9))
        if turn != cur_turn:
            if cur_words:
                events.append(Event(cur_time, "model_text", " ".join(cur_words) + " "))
            cur_turn, cur_words, cur_time = turn, [], w.start
        cur_words.append(w.text)
    if cur_words:
        events.append(Event(cur_time, "model_text", " ".join(cur_words) + " "))
    return events


_FLOOR_LEN = 1 << 17


@functools.lru_cache(maxsize=1)
def _floor_table() -> np.ndarray:
    """8 s of unit-RMS brownish room noise (fixed seed), tiled for the noise floor."""
    x = np.random.default_rng(77).standard_normal(_FLOOR_LEN + 4096)
    x = _signal.lfilter([1.0], [1.0, -0.9], x)[4096:]
    return (x / np.sqrt(np.mean(x * x))).astype(np.float32)


def _noise_floor(n: int, rms: float, offset: int) -> np.ndarray:
    """float32 [n] noise floor: the table read from ``offset`` with wrap-around."""
    table = _floor_table()
    out = np.empty(n, np.float32)
    pos, done = offset % _FLOOR_LEN, 0
    while done < n:
        m = min(n - done, _FLOOR_LEN - pos)
        np.multiply(table[pos:pos + m], np.float32(rms), out=out[done:done + m])
        done += m
        pos = 0
    return out


# ------------------------------------------------------------------------- scenarios


def _arith(rng) -> tuple[str, str, int]:
    a, b = int(rng.integers(1, 10)), int(rng.integers(1, 10))
    q = f"what is {number_words(a)} plus {number_words(b)}?"
    return q, f"{number_words(a)} plus {number_words(b)} is {number_words(a + b)}.", a + b


def _qa(rng) -> tuple[str, str]:
    if rng.random() < 0.25:
        q, a, _ = _arith(rng)
        return q, a
    return _pick(rng, _QA)


def _turn_taking(s: _Scene) -> None:
    rng = s.rng
    t = float(rng.uniform(0.2, 0.8))
    gaps, ends = [], []
    for _ in range(int(rng.integers(2, 4))):
        if t > 8.5:
            break
        q, a = _qa(rng)
        u = s.say("user", q, t)
        s.silent_during(u)
        gap = float(rng.uniform(0.15, 1.0))  # pauses of varied length before the answer
        m = s.say("model", a, u.t1 + gap)
        gaps.append(gap)
        ends.append(u.t1)
        t = m.t1 + float(rng.uniform(0.3, 1.2))
    if t < 13.0 and rng.random() < 0.6:
        u = s.say("user", _pick(rng, _THANKS), t)
        s.silent_during(u)
        gap = float(rng.uniform(0.15, 0.8))
        s.say("model", _pick(rng, _WELCOME), u.t1 + gap)
        gaps.append(gap)
        ends.append(u.t1)
    s.meta.update(response_gaps=gaps, turn_ends=ends)


def _mid_pause(s: _Scene) -> None:
    rng = s.rng
    t = float(rng.uniform(0.2, 0.8))
    if rng.random() < 0.4:  # a first, ordinary exchange
        q, a = _qa(rng)
        u = s.say("user", q, t)
        s.silent_during(u)
        m = s.say("model", a, u.t1 + float(rng.uniform(0.2, 0.7)))
        t = m.t1 + float(rng.uniform(0.4, 1.0))
    q, a = _qa(rng)
    filler = _pick(rng, _FILLERS) if rng.random() < 0.7 else ""
    qwords = q.rstrip("?.").split()
    if rng.random() < 0.5 or len(qwords) < 4:  # prefix + filler, pause, the question
        first = _pick(rng, _PREFIXES).rstrip(",")
        second = q
    else:  # the question itself broken mid-clause
        k = int(rng.integers(2, len(qwords) - 1))
        first, second = " ".join(qwords[:k]), " ".join(qwords[k:]) + q[-1]
    if filler:
        first = f"{first}, {filler}"
    u1 = s.say("user", first, t, intonation="continue")
    pause = float(rng.uniform(0.6, 1.2))
    u2 = s.say("user", second, u1.t1 + pause)
    s.must_stay_silent(u1.t0, u2.t1)
    gap = float(rng.uniform(0.2, 0.6))
    m = s.say("model", a, u2.t1 + gap)
    s.meta.update(pause=[u1.t1, u2.t0], filler=filler, turn_end=u2.t1, response_start=m.t0)


def _backchannel(s: _Scene) -> None:
    rng = s.rng
    clauses, reactions = _pick(rng, _STORIES)
    n = int(rng.integers(3, len(clauses) + 1))
    clauses = clauses[:n - 1] + (clauses[-1],)
    n_bc = int(rng.integers(1, min(2, n - 1) + 1))
    bc_after = sorted(rng.choice(n - 1, size=n_bc, replace=False).tolist())
    t = float(rng.uniform(0.2, 0.7))
    bcs = []
    u = None
    for k, clause in enumerate(clauses):
        u = s.say("user", clause, t)
        s.silent_during(u)
        if k == n - 1:
            break
        if k in bc_after:
            word = _pick(rng, _BACKCHANNELS)
            b = s.say("model", word, u.t1 + float(rng.uniform(0.1, 0.25)))
            s.event(b.t0, "backchannel", word)
            bcs.append([b.t0, b.t1, word])
            t = b.t1 + float(rng.uniform(0.1, 0.3))
        else:
            t = u.t1 + float(rng.uniform(0.3, 0.7))
    m = s.say("model", _pick(rng, reactions), u.t1 + float(rng.uniform(0.2, 0.7)))
    s.meta.update(backchannels=bcs, turn_end=u.t1, response_start=m.t0)


def _interruption(s: _Scene) -> None:
    rng = s.rng
    q, long_answer, follow, answer = _pick(rng, _TOPICS)
    u = s.say("user", q, float(rng.uniform(0.2, 0.7)))
    s.silent_during(u)
    m = s.say("model", long_answer, u.t1 + float(rng.uniform(0.2, 0.6)))
    span = m.t1 - m.t0
    t_int = m.t0 + float(rng.uniform(0.8, max(1.0, min(span - 1.0, 4.0))))
    ui = s.say("user", follow, t_int)
    stop = _next_boundary(ui.t0, 0.05)  # the model stops within ~1 micro-turn
    unsaid = s.cut(m, stop)
    s.must_stay_silent(stop, ui.t1)
    r = s.say("model", answer, ui.t1 + float(rng.uniform(0.2, 0.6)))
    s.meta.update(interrupt_time=ui.t0, model_stop_time=stop, stop_delay=stop - ui.t0,
                  cut_text=unsaid, turn_end=ui.t1, response_start=r.t0)


def _cue_speak(s: _Scene) -> None:
    rng = s.rng
    items = list(_pick(rng, _CATEGORIES))
    cue = items.pop(int(rng.integers(len(items))))
    resp = _pick(rng, _CUE_RESPONSES)
    u = s.say("user", f"when i say {cue}, you say {resp}.", float(rng.uniform(0.2, 0.6)))
    s.silent_during(u)
    ack = s.say("model", _pick(rng, _ACKS), u.t1 + float(rng.uniform(0.2, 0.5)))
    t = ack.t1 + float(rng.uniform(0.4, 0.8))
    intro = s.say("user", _pick(rng, ("here we go.", "okay, listen.", "ready?", "let us start.")), t)
    s.silent_during(intro)
    t = intro.t1 + float(rng.uniform(0.4, 0.8))
    order = rng.permutation(len(items)).tolist()
    n_before = int(rng.integers(1, 5))
    n_after = int(rng.integers(0, 4))
    seq = [items[i] for i in order[:n_before]] + [cue] + [items[i] for i in order[n_before:n_before + n_after]]
    if rng.random() < 0.35 and n_after >= 1:  # a second cue later in the list
        seq.append(cue)
    cues, responses, delays = [], [], []
    list_start = last_end = None
    for word in seq:
        if t > MAX_SECONDS - 2.0:
            break
        w = s.say("user", word, t, intonation="continue")
        if list_start is None:
            list_start = w.t0
        last_end = w.t1
        if word == cue:
            start = _next_boundary(w.t1, 0.02) + float(rng.uniform(0.0, 0.08))
            r = s.say("model", resp, start)
            cues.append([w.t0, w.t1])
            responses.append([r.t0, r.t1])
            delays.append(r.t0 - w.t1)
            t = r.t1 + float(rng.uniform(0.3, 0.6))
        else:
            t = w.t1 + float(rng.uniform(0.35, 0.7))
    for sil in _subtract([[list_start, last_end]], [[c[1], r[1]] for c, r in zip(cues, responses)]):
        s.must_stay_silent(*sil)
    s.meta.update(cue_word=cue, cue_response=resp, cues=cues, responses=responses,
                  response_delays=delays)


def _time_speak(s: _Scene) -> None:
    rng = s.rng
    d = int(rng.integers(2, 7))
    word = _pick(rng, _TIME_WORDS)
    text = _pick(rng, _TIME_TEMPLATES).format(d=number_words(d), w=word)
    u = s.say("user", text, float(rng.uniform(0.2, 0.8)))
    s.silent_during(u)
    quiet_from = u.t1
    if rng.random() < 0.5:
        ack = s.say("model", _pick(rng, ("okay.", "sure.", "will do.")), u.t1 + float(rng.uniform(0.2, 0.4)))
        quiet_from = ack.t1
    target = u.t1 + d
    r = s.say("model", word, target)
    s.must_stay_silent(quiet_from, target - 0.2)
    if rng.random() < 0.5:
        v = s.say("user", _pick(rng, ("nice timing.", "perfect, thanks.", "great.")),
                  r.t1 + float(rng.uniform(0.4, 0.9)))
        s.silent_during(v)
    s.meta.update(delay_seconds=d, target_word=word, request_end=u.t1, target_time=target,
                  response_start=r.t0)


def _background_speech(s: _Scene) -> None:
    rng = s.rng
    others = []
    q, a = _qa(rng)
    u = s.say("user", q, float(rng.uniform(0.2, 0.7)))
    s.silent_during(u)
    overlap = rng.random() < 0.4
    if overlap:  # someone talks in the background while the user speaks
        o = s.say("other", _pick(rng, _BACKGROUND), float(rng.uniform(u.t0, max(u.t0, u.t1 - 0.6))))
        others.append(o)
        t_ans = max(u.t1, o.t1 + 0.3) + float(rng.uniform(0.2, 0.6))
    else:
        t_ans = u.t1 + float(rng.uniform(0.2, 0.6))
    m = s.say("model", a, t_ans)
    # background speech in a silence, not addressed to the model: it must not answer
    o = s.say("other", _pick(rng, _BACKGROUND), m.t1 + float(rng.uniform(0.5, 1.0)))
    others.append(o)
    t = o.t1
    if rng.random() < 0.5:
        o2 = s.say("other", _pick(rng, _BACKGROUND), o.t1 + float(rng.uniform(0.3, 0.8)))
        others.append(o2)
        t = o2.t1
    model_spans = [[u.t0, u.t1] for u in s.utts if u.speaker == "model"]
    for o in others:  # silent during background speech and for 1 s after it
        for a, b in _subtract([[o.t0, o.t1 + 1.0]], model_spans):
            s.must_stay_silent(a, b)
    t += float(rng.uniform(1.0, 1.8))
    if t < 11.0:
        q2, a2 = _qa(rng)
        u2 = s.say("user", q2, t)
        s.silent_during(u2)
        s.say("model", a2, u2.t1 + float(rng.uniform(0.2, 0.6)))
    s.meta.update(other_spans=[[o.t0, o.t1] for o in others], other_level_db=s.other_db)


def _render_motion(rng, n_frames: int, t0: float, period: float, count: int, kind: str,
                   axis: str, color: tuple, backdrop: tuple, radius: int, shape: str) -> np.ndarray:
    """uint8 [F, H, W, 3]: an object at rest, then ``count`` excursions, then at rest."""
    h, w = VIDEO_SIZE
    t = np.arange(n_frames) / VIDEO_FPS
    x = np.clip((t - t0) / period, 0.0, count)  # cycles done
    if kind == "bounce":
        d = np.abs(np.sin(np.pi * x))
    else:
        d = 0.5 * (1.0 - np.cos(2.0 * np.pi * x))
    margin = radius + 3
    length = (w if axis == "x" else h) - 2 * margin - 1
    along = margin + d * length
    across = float(rng.uniform(margin, (h if axis == "x" else w) - margin))
    if kind == "bounce":  # bounce up from the floor: rest at the bottom
        along = (h - 1 - margin) - d * length
    frames = np.empty((n_frames, h, w, 3), np.uint8)
    frames[:] = np.asarray(backdrop, np.uint8)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    inside = (yy * yy + xx * xx <= radius * radius) if shape == "disc" else np.ones_like(yy, bool)
    dy, dx = yy[inside], xx[inside]
    if axis == "x":
        cy = np.full(n_frames, int(round(across)))
        cx = np.round(along).astype(np.int64)
    else:
        cy = np.round(along).astype(np.int64)
        cx = np.full(n_frames, int(round(across)))
    f = np.arange(n_frames)[:, None]
    frames[f, cy[:, None] + dy, cx[:, None] + dx] = np.asarray(color, np.uint8)
    return frames


def _rep_count(s: _Scene) -> None:
    rng = s.rng
    count = int(rng.integers(2, 9))
    kind = "bounce" if rng.random() < 0.35 and count <= 7 else "sway"
    lo, hi = (1.0, 1.4) if kind == "bounce" else (0.6, 1.1)
    period = float(rng.uniform(lo, min(hi, 8.5 / count)))
    axis = "y" if kind == "bounce" else _pick(rng, ("x", "y"))
    color_name = _pick(rng, tuple(_COLORS))
    shape = _pick(rng, ("disc", "square"))
    noun = "ball" if shape == "disc" else "box"
    motion_word = "bounces" if kind == "bounce" else "goes back and forth"
    question_first = bool(rng.random() < 0.5)
    if question_first:
        text = f"watch the {color_name} {noun} and tell me how many times it {motion_word}."
    else:
        text = f"look at the {color_name} {noun}."
    u = s.say("user", text, float(rng.uniform(0.2, 0.6)))
    s.silent_during(u)
    m0 = u.t1 + float(rng.uniform(0.3, 0.8))
    m1 = m0 + count * period
    s.must_stay_silent(u.t1, m1)
    if question_first:
        answer_at = m1 + float(rng.uniform(0.4, 0.8))
    else:
        past = "bounce" if kind == "bounce" else "go back and forth"
        v = s.say("user", f"how many times did it {past}?", m1 + float(rng.uniform(0.3, 0.7)))
        s.silent_during(v)
        s.must_stay_silent(m1, v.t0)
        answer_at = v.t1 + float(rng.uniform(0.2, 0.5))
    n_words = number_words(count)
    did = "bounced" if kind == "bounce" else "went back and forth"
    answer = _pick(rng, (f"{n_words} times.", f"it {did} {n_words} times.", f"{n_words}."))
    r = s.say("model", answer, answer_at)
    n_frames = -(-int(round(max(MIN_SECONDS, r.t1 + s.end_pad) * _SR)) // (_SR // VIDEO_FPS))
    backdrop = _pick(rng, _BACKDROPS)
    s.video = _render_motion(rng, n_frames, m0, period, count, kind, axis, _COLORS[color_name],
                             backdrop, int(rng.integers(6, 10)), shape)
    s.meta.update(expected_count=count, motion=[m0, m1], period=period, motion_kind=kind,
                  axis=axis, question_first=question_first, answer_start=r.t0)


def _typed_text(s: _Scene) -> None:
    rng = s.rng
    t = float(rng.uniform(0.3, 0.8))
    if rng.random() < 0.5:
        u = s.say("user", _pick(rng, ("let me type it.", "i will type my question.", "one second.")), t)
        s.silent_during(u)
        t = u.t1 + float(rng.uniform(0.5, 1.5))
    if rng.random() < 0.6:
        q, a, value = _arith(rng)
        expected = number_words(value)
    else:
        q, a = _pick(rng, _QA)
        expected = " ".join(w for w in tokenize(a) if w not in ",;:.!?")
    s.event(t, "typed", q)
    s.must_stay_silent(0.0, t)  # nothing to answer before the question arrives
    r = s.say("model", a, t + float(rng.uniform(0.4, 0.9)))
    s.meta.update(typed_text=q, typed_time=t, expected_answer=expected, response_start=r.t0)


def _delegate(s: _Scene) -> None:
    rng = s.rng
    city = _pick(rng, _CITIES)
    cond = _pick(rng, _CONDITIONS)
    temp = int(rng.integers(2, 31))
    u = s.say("user", _pick(rng, (f"can you look up the weather in {city}?",
                                  f"what is the weather like in {city} right now?",
                                  f"please check the weather in {city}.")),
              float(rng.uniform(0.2, 0.7)))
    s.silent_during(u)
    ack = s.say("model", _pick(rng, ("sure, let me check.", "one moment, i will look it up.",
                                     "okay, checking now.")), u.t1 + float(rng.uniform(0.2, 0.5)))
    request = f"weather in {city}"
    s.event(ack.t0, "delegate", request)
    result_time = ack.t1 + float(rng.uniform(0.8, 2.5))
    result = f"{city}: {cond}, {temp} degrees"
    s.event(result_time, "background", result)
    s.must_stay_silent(ack.t1, result_time)
    r = s.say("model", f"in {city} it is {cond} and {number_words(temp)} degrees.",
              result_time + float(rng.uniform(0.3, 0.7)))
    s.meta.update(delegate_request=request, delegate_time=ack.t0, result_text=result,
                  result_time=result_time, answer_start=r.t0)


_BUILDERS: dict[str, Callable[[_Scene], None]] = {
    "turn_taking": _turn_taking,
    "mid_pause": _mid_pause,
    "backchannel": _backchannel,
    "interruption": _interruption,
    "cue_speak": _cue_speak,
    "time_speak": _time_speak,
    "background_speech": _background_speech,
    "rep_count": _rep_count,
    "typed_text": _typed_text,
    "delegate": _delegate,
}
assert tuple(_BUILDERS) == SCENARIOS


# ------------------------------------------------------------------------- API


def make_conversation(scenario: str, seed: int, index: int) -> Conversation:
    """One synthetic conversation; a pure function of (scenario, seed, index)."""
    if scenario not in _BUILDERS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {list(SCENARIOS)}")
    for attempt in range(_MAX_ATTEMPTS):  # redraw (deterministically) the rare too-long one
        scene = _Scene(scenario, seed, index, attempt)
        _BUILDERS[scenario](scene)
        conv = scene.finish()
        if conv is not None:
            return conv
    raise RuntimeError(f"{scenario}/{seed}/{index}: no conversation within {MAX_SECONDS}s")


_MAX_ATTEMPTS = 8


def make_corpus(n: int, seed: int, scenarios: Sequence[str] = SCENARIOS) -> Iterator[Conversation]:
    """Conversations ``0 .. n-1``: conversation i is ``make_conversation(scenarios[i % k], seed, i)``."""
    scenarios = tuple(scenarios)
    for i in range(int(n)):
        yield make_conversation(scenarios[i % len(scenarios)], seed, i)


def count_repetitions(video: np.ndarray, low: float = 0.3, high: float = 0.7) -> int:
    """Count back-and-forth cycles of the one moving object in a ``rep_count`` video.

    The object is every pixel that differs from the first frame's corner colour; its
    centroid's distance from where it rests in frame 0 is normalised to [0, 1] and cycles
    are counted with hysteresis (out past ``high``, back below ``low``). Used by tests and
    as a reference answer checker.
    """
    bg = video[0, 0, 0].astype(np.int16)
    mask = np.abs(video.astype(np.int16) - bg).sum(-1) > 40  # [F, H, W]
    ys, xs = np.arange(video.shape[1]), np.arange(video.shape[2])
    area = mask.sum((1, 2)).clip(min=1)
    cy = (mask.sum(2) * ys).sum(1) / area
    cx = (mask.sum(1) * xs).sum(1) / area
    dist = np.hypot(cy - cy[0], cx - cx[0])
    if dist.max() <= 0:
        return 0
    d = dist / dist.max()
    count, out = 0, False
    for v in d:
        if not out and v > high:
            out = True
        elif out and v < low:
            out = False
            count += 1
    return count
