"""GGUF files (llama.cpp, Ollama): metadata into ModelArgs, tensors into canonical names, per-rank slices.

A rank reads (pread) and decodes only
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
from ..quant.ggml import AS_Q4_1, BLOCK_TYPES, as_q4_1_rows, dequantize_rows
from .gguf_file import GGUFFile
from .shard import ShardLayout
from .source import CheckpointError, QuantizedShard, count_types

_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}


POOLING = {1: "mean", 2: "cls", 3: "last"}  # GGUF pooling_type (0: none, 4: rank) -> ours


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
                         max_seq_len=get("context_length", 2048),
                         pooling=POOLING.get(get("pooling_type", 1), "mean"),
                         # a tied output shares the embedding's vocab-split shard at any TP size
                         vocab_parallel_embedding=self.tied_output)

    def tensor_types(self) -> dict[str, int]:
        return count_types(t.type_name for t in self.file.tensors.values())

    def _raw_slice(self, name: str, layout: ShardLayout) -> tuple[torch.Tensor, ShardLayout]:
        """The stored bytes covering this rank's slice, and what is left to cut after decoding them."""
        t = self.tensors[name]
        block, size, _ = BLOCK_TYPES[t.type_name]
        if len(t.shape) == 2 and layout.dim == 0 and layout.parts > 1:
            start, stop = layout.bounds(t.shape[0])
            return torch.from_numpy(t.read_rows(start, stop)), ShardLayout(None)
        if len(t.shape) == 2 and layout.dim == 1 and layout.parts > 1:
            start, stop = layout.bounds(t.shape[1])
            if start % block == 0 and stop % block == 0:  # whole blocks: this rank's byte range of each row
                raw = t.read_rows(0, t.shape[0])[:, start // block * size: stop // block * size]
                return torch.from_numpy(np.ascontiguousarray(raw)), ShardLayout(None)
        return torch.from_numpy(t.read_rows(0, t.data_rows)), layout

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        t = self.tensors[name]
        raw, rest = self._raw_slice(name, layout)
        values = dequantize_rows(raw, t.type_name)
        return rest.take(values.reshape(t.shape) if len(t.shape) == 1 else values)

    def read_quantized(self, name: str, layout: ShardLayout) -> QuantizedShard | None:
        """Q4_0 and Q8_0 stay as stored, Q4_1/Q4_K become Q4_1 blocks (int4 groups of 32); other block types come
        as their bytes ("ggml"), which the loader requantizes where a kernel reads Q8_0. Float types load dense."""
        t = self.tensors[name]
        if BLOCK_TYPES[t.type_name][0] == 1 or len(t.shape) != 2:
            return None
        raw, rest = self._raw_slice(name, layout)
        if rest.dim is not None and rest.parts > 1:  # a slice through the middle of blocks
            return None
        if t.type_name in ("Q8_0", "Q4_0"):  # kept as stored: the CPU kernels read these blocks
            return QuantizedShard(t.type_name.lower(), raw, group_size=32)
        if t.type_name in AS_Q4_1:  # as Q4_1 blocks, which the CPU kernel reads (or which unpack into int4 groups)
            return QuantizedShard("q4_1", as_q4_1_rows(raw, t.type_name), group_size=32)
        return QuantizedShard("ggml", raw, ggml_type=t.type_name)
