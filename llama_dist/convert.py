"""`convert`: any supported checkpoint to Meta format (any shard count) or HF safetensors, tokenizer included."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.hf import save_hf_checkpoint
from .checkpoint.loader import open_checkpoint
from .tokenizer import open_tokenizer
from .checkpoint.meta import save_meta_checkpoint

TARGETS = ("meta", "hf")


def convert(model: str, out: str, to: str = "meta", mp: int = 1, dtype: str = "float32") -> Path:
    if to not in TARGETS:
        raise ValueError(f"target format {to!r}: choose one of {', '.join(TARGETS)}.")
    source = open_checkpoint(model)
    tokenizer = open_tokenizer(source)
    torch_dtype = getattr(torch, dtype)
    if to == "meta":
        path = save_meta_checkpoint(source, out, mp=mp, dtype=torch_dtype)
    else:
        path = save_hf_checkpoint(source, out, dtype=torch_dtype)
    tokenizer.save(path)
    return path
