"""The byte tokenizer and its control tokens."""

import pytest

from tml.text import CONTROL_TOKENS, ByteTokenizer, Tokenizer


def test_byte_tokenizer_round_trip_and_controls():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    text = "héllo, wörld — 3 s"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 256 + len(CONTROL_TOKENS)
    ids = [tok.control_id(n) for n in CONTROL_TOKENS]
    assert len(set(ids)) == len(ids) and min(ids) == 256
    assert all(tok.control_name(i) == n for i, n in zip(ids, CONTROL_TOKENS))
    assert tok.control_name(65) is None
    with pytest.raises(KeyError, match="unknown control token"):
        tok.control_id("<speek>")
    with pytest.raises(ValueError, match="non-byte"):
        tok.decode([65, tok.control_id("<mt>")])
