"""Which dimension each canonical parameter is split on, and how to cut a rank's slice.

Sharding is data: one table of split dims drives model loading, resharding of Meta MP=k
checkpoints, and writing checkpoints back out, so no loader has its own rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.args import ModelArgs

# Parameter name (without "layers.N.") -> dimension split across ranks; None means replicated.
SPLIT_DIMS: dict[str, int | None] = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}
KV_WEIGHTS = ("attention.wk.weight", "attention.wv.weight")
# Model parameters that concatenate several canonical ones (each sharded by its own layout) along dim 0.
FUSED: dict[str, tuple[str, ...]] = {
    "attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}


@dataclass(frozen=True)
class ShardLayout:
    """Slice `index` of `parts` equal slices along `dim` (dim None: the whole tensor)."""

    dim: int | None
    parts: int = 1
    index: int = 0

    def bounds(self, size: int) -> tuple[int, int]:
        step = size // self.parts
        return self.index * step, (self.index + 1) * step

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dim is None or self.parts == 1:
            return tensor
        start, stop = self.bounds(tensor.shape[self.dim])
        return tensor.narrow(self.dim, start, stop - start)


def base_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'attention.wq.weight'."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "layers" else name


def split_dim(name: str, args: ModelArgs) -> int | None:
    base = base_name(name)
    if base == "tok_embeddings.weight":
        return 0 if args.vocab_parallel_embedding else 1
    if base not in SPLIT_DIMS:
        raise KeyError(f"Unknown parameter {name!r}: not part of the Llama architecture.")
    return SPLIT_DIMS[base]


def param_layout(name: str, args: ModelArgs, world_size: int, rank: int) -> ShardLayout:
    """The slice of the full parameter `name` that `rank` of `world_size` holds."""
    dim = split_dim(name, args)
    if dim is None or world_size == 1:
        return ShardLayout(None)
    if base_name(name) in KV_WEIGHTS and world_size > args.n_kv_heads:
        # More ranks than kv heads: each group of world/n_kv ranks shares one kv head.
        return ShardLayout(0, args.n_kv_heads, rank // (world_size // args.n_kv_heads))
    return ShardLayout(dim, world_size, rank)


def canonical_parts(model_param: str) -> list[str]:
    """The canonical names a model parameter is assembled from ('layers.0.attention.wqkv.weight' -> wq, wk, wv)."""
    base = base_name(model_param)
    if base not in FUSED:
        return [model_param]
    prefix = model_param[: len(model_param) - len(base)]
    return [prefix + part for part in FUSED[base]]


def read_shard(source, model_param: str, args: ModelArgs, world_size: int, rank: int,
               device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """This rank's slice of a model parameter on `device` in `dtype` (default: as read), fused ones assembled
    from their canonical parts there: each part is copied once, straight from the (memory-mapped) file."""
    parts = [source.read(n, param_layout(n, args, world_size, rank)) for n in canonical_parts(model_param)]
    if len(parts) == 1:
        return parts[0].to(device=device, dtype=dtype)
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=dtype or parts[0].dtype,
                      device=device or parts[0].device)
    for part, rows in zip(parts, out.split([len(p) for p in parts])):
        rows.copy_(part)
    return out


def full_shape(name: str, args: ModelArgs) -> tuple[int, ...]:
    base, hd = base_name(name), args.head_dim
    shapes = {
        "tok_embeddings.weight": (args.vocab_size, args.dim),
        "attention.wq.weight": (args.n_heads * hd, args.dim),
        "attention.wk.weight": (args.n_kv_heads * hd, args.dim),
        "attention.wv.weight": (args.n_kv_heads * hd, args.dim),
        "attention.wo.weight": (args.dim, args.n_heads * hd),
        "feed_forward.w1.weight": (args.hidden_dim, args.dim),
        "feed_forward.w3.weight": (args.hidden_dim, args.dim),
        "feed_forward.w2.weight": (args.dim, args.hidden_dim),
        "output.weight": (args.vocab_size, args.dim),
    }
    return shapes.get(base, (args.dim,))


def param_names(args: ModelArgs) -> list[str]:
    """Canonical (Meta) names of every parameter, in model order."""
    per_layer = [k for k in SPLIT_DIMS if k not in ("norm.weight", "output.weight")]
    names = ["tok_embeddings.weight"]
    names += [f"layers.{i}.{k}" for i in range(args.n_layers) for k in per_layer]
    return names + ["norm.weight", "output.weight"]


def take_from_pieces(pieces: list[torch.Tensor], full: tuple[int, ...], layout: ShardLayout) -> torch.Tensor:
    """`layout`'s slice of the tensor whose stored pieces (one per source shard) concatenate to shape `full`.

    Reads only the pieces that overlap the slice. Pieces that repeat (replicated norms, kv heads
    copied across more shards than there are heads) are recognised by their size.
    """
    first = pieces[0]
    if tuple(first.shape) == tuple(full):
        return layout.take(first)
    src_dim = next(d for d, (p, f) in enumerate(zip(first.shape, full)) if p != f)
    distinct = full[src_dim] // first.shape[src_dim]
    pieces = pieces[:: len(pieces) // distinct]
    if layout.dim is None or layout.parts == 1:
        return torch.cat(pieces, dim=src_dim)
    if layout.dim != src_dim:
        return torch.cat([layout.take(p) for p in pieces], dim=src_dim)
    start, stop = layout.bounds(full[src_dim])
    out, offset = [], 0
    for piece in pieces:
        size = piece.shape[src_dim]
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            out.append(piece.narrow(src_dim, lo - offset, hi - lo))
        offset += size
    return out[0] if len(out) == 1 else torch.cat(out, dim=src_dim)
