"""Meta's format: params.json + consolidated.NN.pth, one file per model-parallel shard.

Any MP degree loads at any tensor-parallel degree the heads allow: each parameter's pieces are
memory-mapped and only the slice a rank needs is copied out.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from ..model.args import ModelArgs
from .quantized import QuantizedReader
from .shard import ShardLayout, full_shape, param_layout, param_names, take_from_pieces
from .source import CheckpointError, CheckpointSource, QuantizedShard, count_types


def shard_paths(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("consolidated.*.pth"))


class MetaCheckpoint:
    format = "meta"

    def __init__(self, ckpt_dir: str | Path):
        self.path = Path(ckpt_dir)
        if not self.path.is_dir():
            raise CheckpointError(f"Checkpoint directory {self.path} does not exist. Pass a path pointing "
                                  "at the folder that holds params.json and consolidated.*.pth.")
        params = self.path / "params.json"
        if not params.is_file():
            raise CheckpointError(f"{self.path} has no params.json; a Meta checkpoint folder needs params.json "
                                  "beside its consolidated.*.pth files.")
        self.paths = shard_paths(self.path)
        if not self.paths:
            raise CheckpointError(f"{self.path} has params.json but no consolidated.*.pth weight files.")
        # mmap=True reads only each file's index here; weight bytes are touched when a slice is copied.
        self.shards = [self._open_shard(p) for p in self.paths]
        with open(params) as f:
            raw = json.load(f)
        if raw.get("vocab_size", -1) <= 0:  # Llama 1/2 params.json leave it to the tokenizer; the weights know
            raw["vocab_size"] = self.shards[0]["tok_embeddings.weight"].shape[0]
        self.args = ModelArgs.from_dict(raw)
        self.quantization = raw.get("quantization")
        self.quantized = QuantizedReader(self.shards[0], self.quantization, self.path) if self.quantization else None
        if self.quantized and len(self.shards) > 1:
            raise CheckpointError(f"{self.path}: a quantized checkpoint is one consolidated.00.pth; found "
                                  f"{len(self.shards)} shards.")
        missing = [n for n in param_names(self.args)
                   if n not in self.shards[0] and not (self.quantized and self.quantized.has(n))]
        if missing:
            raise CheckpointError(f"{self.paths[0]} lacks {len(missing)} parameters of the model params.json "
                                  f"describes (first: {missing[0]}); the files do not match params.json.")

    @staticmethod
    def _open_shard(path: Path) -> dict[str, torch.Tensor]:
        size = path.stat().st_size
        try:
            zipfile.ZipFile(path).close()  # a truncated file has lost its central directory at the end
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} ({size} bytes) is not a readable PyTorch checkpoint; it is probably "
                                  f"truncated or corrupt (re-download or re-copy it). Reader said: {e}") from None

    def tensor_types(self) -> dict[str, int]:
        return count_types(t.dtype for t in self.shards[0].values())

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        if self.quantized and self.quantized.has(name):  # dense view of a quantized weight (convert, info)
            return layout.take(self.quantized.dequantized(name))
        return take_from_pieces([s[name] for s in self.shards], full_shape(name, self.args), layout)

    def read_quantized(self, name: str, layout: ShardLayout) -> QuantizedShard | None:
        return self.quantized.read_quantized(name, layout) if self.quantized and self.quantized.has(name) else None


def save_meta_checkpoint(source: CheckpointSource, out_dir: str | Path, mp: int = 1,
                         dtype: torch.dtype | None = None) -> Path:
    """Write `source` as a Meta checkpoint with `mp` shards, one shard in memory at a time."""
    args = source.args
    args.check_world_size(mp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(mp):
        shard = {}
        for name in param_names(args):
            tensor = source.read(name, param_layout(name, args, mp, rank))
            shard[name] = tensor.to(dtype or tensor.dtype).contiguous().clone()
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
    with open(out / "params.json", "w") as f:
        json.dump(args.to_params_json(), f, indent=2)
    return out
