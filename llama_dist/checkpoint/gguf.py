"""GGUF files (llama.cpp, Ollama): metadata into ModelArgs, tensors into canonical names, per-rank slices.

The file is memory-mapped; a rank copies out and dequantizes only
the rows (or, for row-parallel weights, the column range of whole blocks) of its own shard.
GGUF keeps Q/K rows in Meta's interleaved rotary order, so no permutation is needed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.args import ModelArgs
from .ggml_quants import BLOCK_TYPES, dequantize_rows
from .gguf_file import GGUFFile
from .shard import ShardLayout
from .source import CheckpointError, count_types

_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
_IGNORED = {"rope_freqs.weight"}


def canonical_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def gguf_name(canonical: str) -> str:
    """The inverse of canonical_name, for writing GGUF-named tensors."""
    for g, c in _TOP_NAMES.items():
        if c == canonical:
            return g
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", canonical)
    short = next(k for k, v in _LAYER_NAMES.items() if v == m.group(2))
    return f"blk.{m.group(1)}.{short}.{m.group(3)}"


class GGUFCheckpoint:
    format = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = self.file.metadata
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.path} holds a {arch!r} model; llama-dist runs the 'llama' architecture "
                                  "(Llama 1/2/3, SmolLM, TinyLlama, Mistral-style) only.")
        if self.file.unsupported:
            name, type_id = next(iter(self.file.unsupported.items()))
            raise CheckpointError(f"{self.path}: tensor {name} has GGML type id {type_id}, which llama-dist cannot "
                                  f"dequantize (supported: {', '.join(BLOCK_TYPES)}).")
        if "rope_freqs.weight" in self.file.tensors:
            raise CheckpointError(f"{self.path} carries per-frequency rope factors (rope_freqs.weight, Llama 3.1 "
                                  "style), which llama-dist does not read from GGUF yet; load the HF or Meta "
                                  "checkpoint of this model instead.")
        self.tensors = {}
        for t in self.file.tensors.values():
            name = canonical_name(t.name)
            if name is None:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} is not part of the Llama architecture.")
            self.tensors[name] = t
        if "output.weight" not in self.tensors:  # tied output: the embedding doubles as the output projection
            self.tensors["output.weight"] = self.tensors["tok_embeddings.weight"]
        self.tied_output = self.tensors["output.weight"] is self.tensors["tok_embeddings.weight"]
        self.args = self._model_args()

    def _model_args(self) -> ModelArgs:
        def get(key: str, default: Any = None) -> Any:
            return self.metadata.get(f"llama.{key}", default)

        emb = self.tensors["tok_embeddings.weight"]
        dim, n_heads = get("embedding_length"), get("attention.head_count")
        head_dim = dim // n_heads
        for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
            if get(key, head_dim) != head_dim:
                raise CheckpointError(f"{self.path}: llama.{key}={get(key)} differs from dim/heads={head_dim}; "
                                      "partial rotary or odd head sizes are not supported.")
        scaling = get("rope.scaling.type", "none")
        if scaling not in ("none", "linear") or (scaling == "linear" and get("rope.scaling.factor", 1.0) != 1.0):
            raise CheckpointError(f"{self.path}: rope scaling {scaling!r} is not supported.")
        return ModelArgs(dim=dim, n_layers=get("block_count"), n_heads=n_heads,
                         n_kv_heads=get("attention.head_count_kv", n_heads),
                         vocab_size=emb.shape[0], hidden_dim=get("feed_forward_length"),
                         norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                         rope_theta=float(get("rope.freq_base", 10000.0)),
                         max_seq_len=get("context_length", 2048))

    def tensor_types(self) -> dict[str, int]:
        return count_types(t.type_name for t in self.file.tensors.values())

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        t = self.tensors[name]
        block, size, _ = BLOCK_TYPES[t.type_name]

        def dequantize(raw: np.ndarray) -> torch.Tensor:
            return dequantize_rows(torch.from_numpy(np.array(raw)), t.type_name)

        if len(t.shape) == 1:
            return dequantize(t.data).reshape(t.shape)
        if layout.dim == 0 and layout.parts > 1:
            start, stop = layout.bounds(t.shape[0])
            return dequantize(t.data[start:stop])
        if layout.dim == 1 and layout.parts > 1:
            start, stop = layout.bounds(t.shape[1])
            if start % block == 0 and stop % block == 0:  # whole blocks: copy only this rank's byte range
                return dequantize(t.data[:, start // block * size: stop // block * size])
        return layout.take(dequantize(t.data))
