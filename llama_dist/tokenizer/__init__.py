"""Tokenizers behind one interface, found from what the model path holds."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Tokenizer

if TYPE_CHECKING:
    from ..checkpoint.source import CheckpointSource


class TokenizerError(ValueError):
    """A tokenizer that is missing, unreadable or does not fit the model."""


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    from .bpe import BPETokenizer
    from .sentencepiece import SentencePieceTokenizer

    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        return BPETokenizer.from_gguf(meta)
    if model == "llama":
        return SentencePieceTokenizer.from_gguf(meta)
    raise TokenizerError(f"GGUF tokenizer model {model!r} is not supported (supported: 'llama', 'gpt2').")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.model (SentencePiece or Llama 3 tiktoken), an HF folder, or a GGUF file."""
    from .bpe import BPETokenizer
    from .sentencepiece import SentencePieceTokenizer
    from .tiktoken_llama3 import TiktokenTokenizer, is_tiktoken_file

    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_folder(path)
        path = path / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"Tokenizer file {path} does not exist. Pass the model's tokenizer.model "
                             "(tokenizer_path), an HF folder with tokenizer.json, or a .gguf file.")
    if path.suffix == ".gguf":
        from ..checkpoint.gguf_file import GGUFFile

        return tokenizer_from_gguf(GGUFFile(path).metadata)
    try:
        if is_tiktoken_file(path):
            return TiktokenTokenizer(path)
        return SentencePieceTokenizer.from_file(path)
    except Exception as e:
        raise TokenizerError(f"{path} is neither a SentencePiece model nor a Llama 3 tiktoken file: {e}") from None


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """A tokenizer with ids beyond the embedding table would index out of range mid-generation."""
    if tokenizer.n_words > vocab_size:
        raise TokenizerError(f"The tokenizer has {tokenizer.n_words} tokens but the model's vocabulary has "
                             f"{vocab_size}: they do not belong together. Pass the model's own tokenizer.")



def open_tokenizer(source: "CheckpointSource", tokenizer_path: str | Path | None = None) -> Tokenizer:
    """The tokenizer given, else the one the model carries (GGUF metadata, HF folder, Meta's tokenizer.model)."""
    from ..checkpoint.gguf import GGUFCheckpoint
    from ..checkpoint.hf import HFCheckpoint

    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    elif isinstance(source, GGUFCheckpoint):
        tokenizer = tokenizer_from_gguf(source.metadata)
    elif isinstance(source, HFCheckpoint):
        tokenizer = load_tokenizer(source.path)
    else:  # Meta ships tokenizer.model beside the weights or one folder up; `convert` writes it inside
        inside = any((source.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        tokenizer = load_tokenizer(source.path if inside else source.path.parent / "tokenizer.model")
    check_vocab(tokenizer, source.args.vocab_size)
    return tokenizer


__all__ = ["Tokenizer", "TokenizerError", "check_vocab", "load_tokenizer", "open_tokenizer", "tokenizer_from_gguf"]
