"""Llama 3's tiktoken-format `tokenizer.model` (base64 token, rank per line) with its 256 special tokens."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Sequence

from .base import wrap
from .bpe import LLAMA3_PATTERN

NUM_RESERVED_SPECIAL_TOKENS = 256
NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def is_tiktoken_file(path: Path) -> bool:
    """Lines of `base64 rank`; a SentencePiece model is a binary protobuf."""
    with open(path, "rb") as f:
        first = f.readline().split()
    try:
        return len(first) == 2 and int(first[1]) >= 0 and len(base64.b64decode(first[0], validate=True)) > 0
    except ValueError:
        return False


class TiktokenTokenizer:
    kind = "tiktoken"
    chat_template = None

    def __init__(self, path: str | Path):
        import tiktoken

        self.model_bytes = Path(path).read_bytes()
        ranks = {}
        for line in self.model_bytes.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        n_base = len(ranks)
        names = NAMED_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                  for i in range(2, NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIALS) + 2)]
        self.special_tokens = {name: n_base + i for i, name in enumerate(names)}
        self.enc = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.n_words = self.enc.n_vocab
        self.bos_id, self.eos_id = self.special_tokens["<|begin_of_text|>"], self.special_tokens["<|end_of_text|>"]
        self.add_bos = True
        self.stop_ids = frozenset({self.eos_id, self.special_tokens["<|eot_id|>"], self.special_tokens["<|eom_id|>"]})

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return wrap(self.enc.encode(text, allowed_special="all"), self, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def save(self, folder: Path) -> None:
        (Path(folder) / "tokenizer.model").write_bytes(self.model_bytes)
