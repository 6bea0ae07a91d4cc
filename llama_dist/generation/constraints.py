"""Constrained decoding: output that must follow a JSON schema or a grammar, enforced token by token.

llguidance (the library behind llama.cpp's and vLLM's guided decoding) turns the schema or grammar into a
matcher over our tokenizer's vocabulary; before each token the matcher says which tokens may come next, and
the sampler sees -inf for the rest. Only the driver (rank 0) samples, so only it holds constraints: every
other rank is unaffected, at any tensor- or pipeline-parallel size.
"""
from __future__ import annotations

import json
import weakref
from typing import Any

import llguidance
import llguidance.gbnf_to_lark
import llguidance.tiktoken
import llguidance.torch
import torch

from ..tokenizer import Tokenizer

_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled."""


# As llama.cpp's JSON grammars: between tokens nothing, a space, or a newline and up to 20 spaces or tabs (any
# amount of whitespace lets a sampled answer run to its token limit in blank lines), and integers of at most 16
# digits (else "1, 2, 3, ..." can grow one digit at a time until the limit).
JSON_WHITESPACE = r"(?: |\n[ \t]{0,20})?"
INTEGER_BOUND = 10 ** 16 - 1
_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # JSON values, not schemas


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """Output that parses as JSON valid against the schema ({} or True: any JSON value)."""
    schema = {} if schema is True else schema
    if not isinstance(schema, dict):
        raise GrammarError(f"A JSON schema must be an object (or true), not {json.dumps(schema)[:40]}.")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(_bounded(schema)),
                                                             defaults={"whitespace_pattern": JSON_WHITESPACE})
    except ValueError as e:
        raise GrammarError(f"The JSON schema is not usable: {e}") from None


def _bounded(schema: Any) -> Any:
    """The schema with llama.cpp's 16-digit limit on integers that have no bounds of their own."""
    if isinstance(schema, list):
        return [_bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else _bounded(v) for k, v in schema.items()}
    if out.get("type") == "integer":
        if not {"minimum", "exclusiveMinimum"} & out.keys():
            out["minimum"] = -INTEGER_BOUND
        if not {"maximum", "exclusiveMaximum"} & out.keys():
            out["maximum"] = INTEGER_BOUND
    return out


def gbnf_grammar(gbnf: str) -> str:
    """A llama.cpp GBNF grammar (root rule `root`)."""
    try:
        return llguidance.LLMatcher.grammar_from_lark(llguidance.gbnf_to_lark.gbnf_to_lark(gbnf))
    except Exception as e:  # the converter raises plain exceptions for syntax errors
        raise GrammarError(f"The grammar does not parse as GBNF: {e}") from None


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer (built once per tokenizer: it walks the whole vocabulary)."""
    if tokenizer not in _LL_TOKENIZERS:
        eos = sorted(tokenizer.stop_ids)
        if tokenizer.kind == "bpe":  # a HF tokenizers model: llguidance reads its JSON
            ll = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size, eos_token=eos)
        elif tokenizer.kind == "tiktoken":
            ll = llguidance.tiktoken.lltokenizer_from_encoding(tokenizer.enc, n_vocab=vocab_size, eos_token=eos)
        else:
            ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_PieceBytes(tokenizer)), n_vocab=vocab_size,
                                        eos_token=eos)
        _LL_TOKENIZERS[tokenizer] = ll
    return _LL_TOKENIZERS[tokenizer]


class _PieceBytes:
    """A SentencePiece vocabulary as the bytes each token stands for (what llguidance's wrapper asks)."""

    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.sp
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = [i for i in range(sp.vocab_size()) if sp.is_control(i)]
        self.tokens = [self._bytes(sp, i) for i in range(sp.vocab_size())]
        self._encode = lambda text: tokenizer.encode(text, bos=False)

    @staticmethod
    def _bytes(sp, i: int) -> bytes:
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):  # <0xNN>
            return bytes([int(piece[3:5], 16)])
        if sp.is_control(i) or sp.is_unknown(i):
            return b"\xff" + piece.encode()  # llguidance's mark for a special token
        return piece.replace("\u2581", " ").encode()

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class Constraint:
    """One request's grammar, as the sampler consults it: allowed() before each token, consume() after."""

    def __init__(self, grammar: str, tokenizer: Tokenizer, vocab_size: int):
        ll = _ll_tokenizer(tokenizer, vocab_size)
        error = llguidance.LLMatcher.validate_grammar(grammar, ll)
        if error:
            raise GrammarError(f"The schema or grammar is not usable: {error}")
        self.matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        self.vocab_size = vocab_size
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [vocab] with every token the grammar forbids next at -inf."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        masked = logits.float().clone()[None].cpu()
        llguidance.torch.apply_token_bitmask_inplace(masked, self._bitmask)
        return masked[0].to(logits.device)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but an end token may follow."""
        return self.matcher.is_stopped()
