"""`info`: what a model path holds, without loading its weights."""
from __future__ import annotations

import math
from typing import Any

from .checkpoint.loader import describe, open_checkpoint
from .tokenizer import open_tokenizer
from .checkpoint.shard import full_shape, param_names


def model_info(model: str) -> dict[str, Any]:
    source = open_checkpoint(model)
    args = source.args
    tokenizer = open_tokenizer(source)
    return {
        "format": describe(source),
        "architecture": "llama",
        "parameters": sum(math.prod(full_shape(n, args)) for n in param_names(args)),
        "dim": args.dim, "layers": args.n_layers, "heads": args.n_heads, "kv_heads": args.n_kv_heads,
        "ffn_hidden": args.hidden_dim, "vocab": args.vocab_size, "rope_theta": args.rope_theta,
        "context": args.max_seq_len, "tensor_types": source.tensor_types(),
        "tokenizer": tokenizer.kind, "chat_template": bool(tokenizer.chat_template),
        "tensor_parallel_sizes": args.valid_world_sizes(),
    }
