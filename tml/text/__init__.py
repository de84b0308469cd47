"""Text front end: tokenizers with the micro-turn control tokens."""

from tml.text.tokenizer import CONTROL_ACTIONS, CONTROL_TOKENS, ByteTokenizer, Tokenizer

__all__ = ["ByteTokenizer", "CONTROL_ACTIONS", "CONTROL_TOKENS", "Tokenizer"]
