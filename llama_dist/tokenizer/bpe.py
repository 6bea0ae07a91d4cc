"""Byte-level BPE through the `tokenizers` library: HF tokenizer.json, and GGUF `gpt2` vocabularies.

For GGUF the pre-tokenizer is rebuilt from llama.cpp's named presets (tokenizer.ggml.pre), so
text is split exactly as llama.cpp splits it (e.g. `smollm` isolates every digit).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizerModel

from .base import end_of_turn_ids, read_config, wrap, write_config

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_PATTERN = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer name -> (regexes applied in turn, whether a whole word in the vocab skips merging)
PRE_TOKENIZERS = {
    "default": ([GPT2_PATTERN], False),
    "gpt2": ([GPT2_PATTERN], False),
    "smollm": ([r"\p{N}", GPT2_PATTERN], False),
    "starcoder": ([r"\p{N}", GPT2_PATTERN], False),
    "refact": ([r"\p{N}", GPT2_PATTERN], False),
    "llama-bpe": ([LLAMA3_PATTERN], True),
    "llama3": ([LLAMA3_PATTERN], True),
}
CONTROL, USER_DEFINED = 3, 4


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok: HFTokenizerModel, bos_id: int, eos_id: int, add_bos: bool,
                 chat_template: str | None = None):
        self.tok, self.bos_id, self.eos_id, self.add_bos = tok, bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self.n_words = tok.get_vocab_size(with_added_tokens=True)
        self.stop_ids = end_of_turn_ids(tok.get_vocab(with_added_tokens=True).items(), eos_id)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "BPETokenizer":
        from . import TokenizerError

        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"GGUF BPE pre-tokenizer {pre!r} is not supported "
                                 f"(supported: {', '.join(PRE_TOKENIZERS)}).")
        patterns, ignore_merges = PRE_TOKENIZERS[pre]
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = HFTokenizerModel(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                          ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)])
        return cls(tok, meta.get("tokenizer.ggml.bos_token_id", 1), meta.get("tokenizer.ggml.eos_token_id", 2),
                   add_bos=meta.get("tokenizer.ggml.add_bos_token", False),
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "BPETokenizer":
        """HF folder: tokenizer.json, with BOS/EOS and the chat template from tokenizer_config.json."""
        folder = Path(folder)
        tok = HFTokenizerModel.from_file(str(folder / "tokenizer.json"))
        config = read_config(folder)

        def token_id(key: str, default: int) -> int:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            found = tok.token_to_id(value) if isinstance(value, str) else None
            return default if found is None else found

        bos, eos = token_id("bos_token", 1), token_id("eos_token", 2)
        # Without an explicit flag, HF's own post-processor tells whether prompts start with BOS.
        add_bos = config.get("add_bos_token", tok.encode("a", add_special_tokens=True).ids[:1] == [bos])
        return cls(tok, bos, eos, add_bos=bool(add_bos), chat_template=config.get("chat_template"))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return wrap(self.tok.encode(text, add_special_tokens=False).ids, self, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    def save(self, folder: Path) -> None:
        self.tok.save(str(Path(folder) / "tokenizer.json"))
        write_config(folder, self)
