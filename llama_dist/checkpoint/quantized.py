"""Quantized checkpoints written by `llama-dist quantize`: a Meta-style folder that loads at any TP size.

params.json carries {"quantization": {"type": "int8"|"int4", "group_size": G}}; consolidated.00.pth
holds, for every linear weight NAME, NAME.q (int8 [out, in], or int4 as uint8 nibble pairs
[out, in/2]), NAME.scales and for int4 NAME.zeros ([out, in/G]); norms and embeddings stay dense.
Full (unsharded) tensors are stored, so each rank slices rows, columns and groups for its shard.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..quant.weights import int4_dequantize, int4_quantize, int8_quantize
from .shard import ShardLayout, param_names, split_dim
from .source import CheckpointError, CheckpointSource, QuantizedShard


def is_quantizable(name: str) -> bool:
    """Every matrix of a linear layer; norms and the embedding table stay dense."""
    return name != "tok_embeddings.weight" and split_dim(name, None) is not None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def save_quantized_checkpoint(source: CheckpointSource, out_dir: str | Path, kind: str, group_size: int = 32,
                              dtype: torch.dtype = torch.bfloat16) -> Path:
    if kind not in ("int8", "int4"):
        raise ValueError(f"quantization type {kind!r}: choose int8 or int4.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args, full = source.args, ShardLayout(None)
    tensors = {}
    for name in param_names(args):
        w = source.read(name, full)
        if not is_quantizable(name):
            tensors[name] = w.to(dtype).contiguous()
        elif kind == "int8":
            tensors[f"{name}.q"], tensors[f"{name}.scales"] = int8_quantize(w)
        else:
            q, scales, zeros = int4_quantize(w, group_size)
            tensors[f"{name}.q"], tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = pack_nibbles(q), scales, zeros
    torch.save(tensors, out / "consolidated.00.pth")
    params = {**args.to_params_json(), "quantization": {"type": kind, "group_size": group_size}}
    (out / "params.json").write_text(json.dumps(params, indent=2))
    return out


class QuantizedReader:
    """Mixed into MetaCheckpoint when params.json declares a quantization."""

    def __init__(self, shard: dict[str, torch.Tensor], quantization: dict, path: Path):
        self.shard, self.kind, self.group_size = shard, quantization["type"], quantization.get("group_size", 0)
        self.path = path

    def has(self, name: str) -> bool:
        return f"{name}.q" in self.shard

    def read_quantized(self, name: str, layout: ShardLayout) -> QuantizedShard:
        q, scales = self.shard[f"{name}.q"], self.shard[f"{name}.scales"]
        zeros = self.shard.get(f"{name}.zeros")
        if layout.dim == 0:
            q, scales = layout.take(q), layout.take(scales)
            zeros = layout.take(zeros) if zeros is not None else None
        elif layout.dim == 1 and layout.parts > 1:
            if self.kind == "int8":  # per-row scales apply to every column slice unchanged
                q = layout.take(q)
            else:
                groups = scales.shape[1]
                if groups % layout.parts:
                    raise CheckpointError(f"{self.path}: {name} has {groups} int4 groups of {self.group_size}, "
                                          f"which do not split evenly across {layout.parts} ranks; quantize with a "
                                          "smaller group size.")
                q, scales, zeros = layout.take(q), layout.take(scales), layout.take(zeros)
        if self.kind == "int4":
            q = unpack_nibbles(q)
        return QuantizedShard(self.kind, q.contiguous(), scales.contiguous(),
                              zeros.contiguous() if zeros is not None else None, self.group_size)

    def dequantized(self, name: str) -> torch.Tensor:
        s = self.read_quantized(name, ShardLayout(None))
        if s.kind == "int8":
            return s.q.float() * s.scales[:, None]
        return int4_dequantize(s.q, s.scales, s.zeros)
