"""Tokenizers behind one interface, chosen by what the file is."""
from __future__ import annotations

from pathlib import Path

from .base import Tokenizer
from .sentencepiece import SentencePieceTokenizer


class TokenizerError(ValueError):
    """A tokenizer that is missing, unreadable or does not fit the model."""


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"Tokenizer file {path} does not exist. Pass --tokenizer_path pointing at the "
                             "model's tokenizer.model.")
    try:
        return SentencePieceTokenizer(path)
    except Exception as e:
        raise TokenizerError(f"{path} is not a SentencePiece tokenizer model: {e}") from None


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A tokenizer with ids beyond the embedding table would index out of range mid-generation."""
    if tokenizer.n_words > vocab_size:
        raise TokenizerError(f"The tokenizer has {tokenizer.n_words} tokens but the model's vocabulary has "
                             f"{vocab_size}: they do not belong together. Pass the model's own tokenizer.")


__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "check_vocab", "SentencePieceTokenizer"]
