"""Incremental detokenization: emit text only once its UTF-8 characters are complete."""
from __future__ import annotations

from .base import Tokenizer

CONTEXT_TOKENS = 6  # tokens before the new ones decoded with them, for the tokenizer's spacing rules


class TextStream:
    """Feed token ids one at a time; get back the new text they complete.

    Each push decodes the last few tokens with the new one and emits what the new one added (so spacing
    rules that look at the previous token, such as SentencePiece's leading space, come out as in decoding
    the whole text; and each push costs the same however long the answer). A multi-byte character split
    across tokens decodes to U+FFFD until its last byte arrives, so text ending in U+FFFD is held back.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.start = 0  # the decoded window: ids[start:]
        self.done = 0  # ids[start:done] were emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.start:self.done])
        text = self.tokenizer.decode(self.ids[self.start:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.start, self.done = max(self.start, len(self.ids) - CONTEXT_TOKENS), len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included."""
        before = self.tokenizer.decode(self.ids[self.start:self.done])
        text = self.tokenizer.decode(self.ids[self.start:])
        self.done = len(self.ids)
        return text[len(before):]
