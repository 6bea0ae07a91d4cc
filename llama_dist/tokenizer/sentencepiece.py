"""SentencePiece `tokenizer.model` (Llama 1/2, and test tokenizers trained on the fly)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sentencepiece import SentencePieceProcessor


class SentencePieceTokenizer:
    def __init__(self, model_path: str | Path):
        self.sp = SentencePieceProcessor(model_file=str(model_path))
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))
