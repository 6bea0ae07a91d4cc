"""What to load and how: one value built once (by the CLI, or by Llama.build from Meta's arguments)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.weights import QUANT_TYPES

QUANTIZE_CHOICES = ("auto", "none", *QUANT_TYPES)


@dataclass(frozen=True)
class LoadConfig:
    """model: a Meta folder, an HF folder, a .gguf file or `smollm2`; tokenizer: None for the one the model
    carries; dtype: activations and dense weights (None: the device's default); quantize: "auto" keeps what the
    checkpoint stores, "none" loads dense, "int8"/"int4" quantize at load time (int4 in groups of group_size);
    n_ctx: tokens of context per sequence; max_batch_size: sequences at once; kv_tokens: tokens the KV cache
    holds for all of them (None: max_batch_size x n_ctx; fewer lets a server run more sequences than their
    longest contexts would fit, sharing the cache out in blocks as they grow);
    compile: the one-token decode step compiled (CUDA graphs on GPUs); cuda_graphs: without compile, the decode
    step on GPUs replays CUDA graphs captured at load, one per batch bucket, and so does a server's packed prompt
    pass, one per token bucket, where its kernels allow (runner/graphs.py); batch_invariant: on GPUs, kernels
    whose every row computes the same whatever shares its batch, so a greedy answer does not depend on what else
    runs (kernels/invariant.py; slower, dense weights only; on CPUs quantized weights' block kernels already
    are, and dense weights are refused)."""

    model: str = "smollm2"
    tokenizer: str | None = None
    dtype: str | None = None
    quantize: str = "auto"
    group_size: int = 32
    n_ctx: int = 512
    max_batch_size: int = 8
    kv_tokens: int | None = None
    compile: bool = False
    cuda_graphs: bool = True
    batch_invariant: bool = False

    def __post_init__(self):
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize={self.quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}.")
        for name in ("group_size", "n_ctx", "max_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: it must be at least 1.")
        if self.kv_tokens is not None and not self.n_ctx <= int(self.kv_tokens):
            raise ValueError(f"kv_tokens={self.kv_tokens}: the KV cache must hold at least one context of "
                             f"n_ctx={self.n_ctx} tokens.")
        if self.dtype is not None and not isinstance(getattr(torch, str(self.dtype).removeprefix("torch."), None),
                                                     torch.dtype):
            raise ValueError(f"dtype={self.dtype!r} is not a torch dtype; try float32, bfloat16 or float16.")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else getattr(torch, str(self.dtype).removeprefix("torch."))
