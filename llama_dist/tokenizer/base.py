"""What generation needs from any tokenizer, and the pieces all tokenizers share."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

CONFIG_FILE = "tokenizer_config.json"


class Tokenizer(Protocol):
    kind: str  # "sentencepiece" | "bpe" | "tiktoken"
    n_words: int
    bos_id: int
    eos_id: int
    add_bos: bool  # whether this model's prompts start with BOS
    stop_ids: frozenset[int]  # generation ends at any of these (eos, end-of-turn tokens)
    chat_template: str | None  # Jinja template shipped with the model, if any

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. <|im_start|>) become their ids.
        `bos=True` adds BOS only if the model wants it (add_bos)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry itself (for templates and error messages)."""
        ...

    def save(self, folder: Path) -> None:
        """Write files that load_tokenizer(folder) reads back into an equal tokenizer."""
        ...


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_config(folder: Path, tokenizer: Tokenizer) -> None:
    """HF's tokenizer_config.json keys: special tokens, whether to add BOS, the chat template."""
    config = {"bos_token": tokenizer.token_text(tokenizer.bos_id), "eos_token": tokenizer.token_text(tokenizer.eos_id),
              "add_bos_token": tokenizer.add_bos, "chat_template": tokenizer.chat_template}
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))


def split_specials(text: str, specials: dict[str, int], encode_plain: Callable[[str], list[int]]) -> list[int]:
    """Encode text in which special-token strings stand for their ids (llama.cpp's `special=True`)."""
    if not specials:
        return encode_plain(text) if text else []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for i, part in enumerate(re.split(pattern, text)):
        if i % 2:
            ids.append(specials[part])
        elif part:
            ids += encode_plain(part)
    return ids


def wrap(ids: list[int], tokenizer: Tokenizer, bos: bool, eos: bool) -> list[int]:
    return ([tokenizer.bos_id] if bos and tokenizer.add_bos else []) + ids + ([tokenizer.eos_id] if eos else [])


def end_of_turn_ids(vocab: Iterable[tuple[str, int]], eos_id: int) -> frozenset[int]:
    """EOS plus the end-of-turn markers chat models emit instead of EOS."""
    markers = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<end_of_turn>", "</s>"}
    return frozenset({eos_id} | {i for text, i in vocab if text in markers})
