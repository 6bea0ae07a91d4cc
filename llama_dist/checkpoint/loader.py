"""Find the checkpoint format at a path, and build a rank's model from it."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..distributed.context import ParallelContext
from ..model.transformer import Transformer
from .meta import MetaCheckpoint
from .shard import param_layout
from .source import CheckpointError, CheckpointSource


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Validate and open a checkpoint (cheap: nothing but indexes and metadata is read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Model path {path} does not exist. Pass a Meta checkpoint folder "
                              "(params.json + consolidated.*.pth).")
    if path.is_dir() and ((path / "params.json").exists() or any(path.glob("*.pth"))):
        return MetaCheckpoint(path)
    raise CheckpointError(f"Cannot tell the format of {path}: expected a Meta checkpoint folder "
                          "(params.json + consolidated.*.pth).")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_model(source: CheckpointSource, ctx: ParallelContext, dtype: torch.dtype | None = None,
               max_seq_len: int = 2048, max_batch_size: int = 8, progress: bool = True) -> Transformer:
    """Create the model at shard size without memory, then fill each parameter with this rank's slice."""
    args = source.args
    args.check_world_size(ctx.world_size)
    dtype = dtype or default_dtype(ctx.device)
    with torch.device("meta"):
        model = Transformer(args, ctx.comm, dtype=dtype)
    state = {}
    names = list(model.state_dict())
    for name in tqdm(names, desc="loading", unit="tensor", disable=not (progress and ctx.is_driver)):
        expected = model.get_parameter(name).shape
        tensor = source.read(name, param_layout(name, args, ctx.world_size, ctx.rank))
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"{name}: the checkpoint gives shape {tuple(tensor.shape)} for rank {ctx.rank} "
                                  f"but the model expects {tuple(expected)}; the weights do not match the config.")
        state[name] = tensor.to(device=ctx.device, dtype=dtype).contiguous()
    model.load_state_dict(state, assign=True)
    model.setup_caches(max_batch_size, max_seq_len)
    return model.eval()
