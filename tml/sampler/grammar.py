"""The output grammar of a micro-turn, as :func:`tml.stream.layout` writes it::

    <out> [text bytes…] (<speak> <speech>×4 | <silence>) [control…] <end>

:class:`OutputGrammar` tracks one micro-turn's outputs and says which tokens may come
next (a mask applied in sampling only; the reported log-prob is always the model's
unconstrained one). Two extra rules keep every sampled micro-turn a valid layout:

* **text is valid UTF-8**: a lead byte is followed by exactly the continuation bytes the
  UTF-8 standard allows (no overlong forms, no surrogates), and ``<speak>``/``<silence>``
  are refused in the middle of a character — so ``model_text`` decodes and re-encodes to
  the same bytes and ``layout`` of the committed micro-turn is what the engine fed;
* **the budget**: at most ``max_tokens`` output tokens after ``<out>`` (``<end>``
  included). A token is allowed only if the shortest valid completion after it still
  fits; when only ``<end>`` fits it is forced (and still reported with its log-prob).
  ``max_text_bytes`` optionally bounds the text bytes alone (0: a speech-only agent).
"""

from __future__ import annotations

import numpy as np

from tml.stream.micro_turns import FRAMES_PER_MICRO_TURN
from tml.text import CONTROL_ACTIONS, Tokenizer

TEXT, SPEECH, CONTROL, DONE = "text", "speech", "control", "done"


def _utf8_lead(b: int) -> tuple[int, tuple[int, int]] | None:
    """Continuation bytes a lead byte needs and the range of the first one (None: invalid lead)."""
    if b < 0x80:
        return 0, (0, 0)
    if 0xC2 <= b <= 0xDF:
        return 1, (0x80, 0xBF)
    if 0xE0 <= b <= 0xEF:
        return 2, {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F)}.get(b, (0x80, 0xBF))
    if 0xF0 <= b <= 0xF4:
        return 3, {0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(b, (0x80, 0xBF))
    return None


# continuation bytes each byte needs as a lead byte; -1: not a valid lead byte
_LEAD_NEED = np.array([-1 if _utf8_lead(b) is None else _utf8_lead(b)[0] for b in range(256)])


class OutputGrammar:
    """State of one micro-turn's outputs. ``allowed()`` → bool [vocab]; ``advance(token)``."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, max_text_bytes: int | None = None):
        if max_tokens < 2:
            raise ValueError(f"max_output_tokens={max_tokens}: a micro-turn needs at least 2 output "
                             "tokens (<silence> <end>); 6 let the model speak")
        if max_text_bytes is not None and max_text_bytes < 0:
            raise ValueError(f"max_text_bytes={max_text_bytes} must be >= 0 (or None: only the budget limits text)")
        self.tok, self.max = tokenizer, max_tokens
        self.max_text = max_tokens if max_text_bytes is None else max_text_bytes
        self.n_text = 0
        c = tokenizer.control_id
        self.speak, self.silence, self.end, self.speech = c("<speak>"), c("<silence>"), c("<end>"), c("<speech>")
        self.actions = [c(a) for a in CONTROL_ACTIONS]
        self.phase, self.n, self.speech_left = TEXT, 0, 0
        self.utf8_left, self.utf8_range = 0, (0x80, 0xBF)
        self.forced_end = False

    def _fits(self, after: int) -> bool:
        """A token followed by a shortest completion of ``after`` tokens fits the budget."""
        return self.n + 1 + after <= self.max

    def allowed(self) -> np.ndarray:
        m = np.zeros(self.tok.vocab_size, bool)
        if self.phase == TEXT:
            if self.utf8_left:
                lo, hi = self.utf8_range
                m[lo:hi + 1] = True           # budget reserved when the lead byte was allowed
                return m
            need = _LEAD_NEED
            # the whole character, then <silence> <end>, must fit
            m[:256] = (need >= 0) & (self.n_text + 1 + need <= self.max_text) & (self.n + 1 + need + 2 <= self.max)
            m[self.silence] = self._fits(1)
            m[self.speak] = self._fits(FRAMES_PER_MICRO_TURN + 1)
        elif self.phase == CONTROL:
            for a in self.actions:
                m[a] = self._fits(1)
            m[self.end] = True
            self.forced_end = not any(m[a] for a in self.actions)
        else:
            raise RuntimeError(f"no token is sampled in phase {self.phase!r}")
        return m

    def advance(self, token: int) -> None:
        self.n += 1
        if self.phase == SPEECH:
            assert token == self.speech
            self.speech_left -= 1
            if not self.speech_left:
                self.phase = CONTROL
        elif self.phase == TEXT and token < 256:
            self.n_text += 1
            if self.utf8_left:
                self.utf8_left -= 1
                self.utf8_range = (0x80, 0xBF)
            else:
                self.utf8_left, self.utf8_range = _utf8_lead(token)
        elif token == self.speak:
            self.phase, self.speech_left = SPEECH, FRAMES_PER_MICRO_TURN
        elif token == self.silence:
            self.phase = CONTROL
        elif token == self.end:
            self.phase = DONE
        elif token not in self.actions:
            raise ValueError(f"token {token} breaks the output grammar in phase {self.phase!r}")
