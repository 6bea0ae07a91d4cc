"""Incremental detokenization: emit text only once its UTF-8 characters are complete."""
from __future__ import annotations

from .base import Tokenizer


class TextStream:
    """Feed token ids one at a time; get back the new text they complete.

    A multi-byte character split across tokens decodes to U+FFFD until its last byte
    arrives, so text ending in U+FFFD is held back. Decoding the whole sequence each time
    keeps tokenizer-specific spacing rules (SentencePiece's leading space) right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included."""
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new
