"""Find the checkpoint format at a path, and build a rank's model from it."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..distributed.context import ParallelContext
from ..model.transformer import Transformer
from ..models import resolve_model
from ..tokenizer import Tokenizer, check_vocab, load_tokenizer, tokenizer_from_gguf
from .gguf import GGUFCheckpoint
from .hf import HFCheckpoint
from .meta import MetaCheckpoint
from .shard import read_shard
from .source import CheckpointError, CheckpointSource


FORMATS_HELP = ("a Meta folder (params.json + consolidated.*.pth), a Hugging Face folder "
                "(config.json + *.safetensors) or a .gguf file")


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Find the format and validate (cheap: nothing but headers, indexes and metadata is read)."""
    path = Path(resolve_model(str(path)))
    if not path.exists():
        raise CheckpointError(f"Model path {path} does not exist. Pass {FORMATS_HELP}.")
    if path.is_file():
        return GGUFCheckpoint(path)  # says so clearly if the file is not GGUF
    if (path / "params.json").exists() or any(path.glob("*.pth")):
        return MetaCheckpoint(path)
    if (path / "config.json").exists() or any(path.glob("*.safetensors")):
        return HFCheckpoint(path)
    raise CheckpointError(f"Cannot tell the format of {path}: expected {FORMATS_HELP}.")


def describe(source: CheckpointSource) -> str:
    return {"meta": "Meta checkpoint", "hf": "Hugging Face safetensors", "gguf": "GGUF file"}.get(
        source.format, source.format)


def open_tokenizer(source: CheckpointSource, tokenizer_path: str | Path | None = None) -> Tokenizer:
    """The tokenizer given, else the one the model carries (GGUF metadata, HF folder, Meta's tokenizer.model)."""
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    elif isinstance(source, GGUFCheckpoint):
        tokenizer = tokenizer_from_gguf(source.metadata)
    elif isinstance(source, HFCheckpoint):
        tokenizer = load_tokenizer(source.path)
    else:  # Meta ships tokenizer.model beside the weights or one folder up; `convert` writes it inside
        inside = any((source.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        tokenizer = load_tokenizer(source.path if inside else source.path.parent / "tokenizer.model")
    check_vocab(tokenizer, source.args.vocab_size)
    return tokenizer


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
        tensor = read_shard(source, name, args, ctx.world_size, ctx.rank)
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"{name}: the checkpoint gives shape {tuple(tensor.shape)} for rank {ctx.rank} "
                                  f"but the model expects {tuple(expected)}; the weights do not match the config.")
        state[name] = tensor.to(device=ctx.device, dtype=dtype).contiguous()
    model.load_state_dict(state, assign=True)
    model.setup_caches(max_batch_size, max_seq_len)
    return model.eval()
