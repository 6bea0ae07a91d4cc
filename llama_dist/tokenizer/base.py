"""What generation needs from any tokenizer."""
from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
    n_words: int
    bos_id: int
    eos_id: int
    stop_ids: frozenset[int]  # generation ends at any of these (eos, end-of-turn tokens)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...
