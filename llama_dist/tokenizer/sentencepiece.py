"""SentencePiece tokenizers: Meta's `tokenizer.model`, and GGUF `llama` vocabularies rebuilt as one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sentencepiece import SentencePieceProcessor

from .base import read_config, split_specials, wrap, write_config

# SentencePiece piece types, which GGUF's tokenizer.ggml.token_type reuses.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, sp: SentencePieceProcessor, add_bos: bool = True, chat_template: str | None = None):
        self.sp, self.add_bos, self.chat_template = sp, add_bos, chat_template
        self.n_words = sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
        self.stop_ids = frozenset({self.eos_id})
        # Control tokens written as text (e.g. "<s>" in a rendered chat template) map to their ids.
        self.specials = {sp.id_to_piece(i): i for i in range(self.n_words) if sp.is_control(i) and i != sp.unk_id()}

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        """tokenizer.model, with add_bos and the chat template from a tokenizer_config.json beside it."""
        config = read_config(Path(path).parent)
        return cls(SentencePieceProcessor(model_file=str(path)), add_bos=config.get("add_bos_token", True),
                   chat_template=config.get("chat_template"))

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "SentencePieceTokenizer":
        """Rebuild a SentencePiece model from GGUF's tokens, scores and types."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = types or [NORMAL] * len(tokens)
        proto = pb.ModelProto()
        proto.trainer_spec.model_type = pb.TrainerSpec.BPE
        proto.trainer_spec.byte_fallback = BYTE in types
        proto.trainer_spec.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
        proto.trainer_spec.bos_id = meta.get("tokenizer.ggml.bos_token_id", 1)
        proto.trainer_spec.eos_id = meta.get("tokenizer.ggml.eos_token_id", 2)
        proto.trainer_spec.pad_id = meta.get("tokenizer.ggml.padding_token_id", -1)
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        for text, score, kind in zip(tokens, scores, types):
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = text, score, kind
        sp = SentencePieceProcessor(model_proto=proto.SerializeToString())
        return cls(sp, add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
                   chat_template=meta.get("tokenizer.chat_template"))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return wrap(split_specials(text, self.specials, self.sp.encode), self, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def save(self, folder: Path) -> None:
        (Path(folder) / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())
        write_config(folder, self)
