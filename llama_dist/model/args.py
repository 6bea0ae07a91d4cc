"""ModelArgs: the shape of a Llama-family network, and the tensor-parallel sizes that shape allows."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1: taken from the checkpoint (Meta's Llama 1/2 params.json)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit FFN width (HF/GGUF); otherwise derived as Meta does
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1 long-context frequency scaling
    rope_scaling: dict[str, float] = field(default_factory=dict)
    vocab_parallel_embedding: bool | None = None  # None: Llama 3 style (vocab split) when vocab >= 128000
    max_seq_len: int = 2048
    pooling: str = "mean"  # how embeddings pool the final hidden states: mean | cls | last (GGUF pooling_type)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.use_scaled_rope and not self.rope_scaling:
            self.rope_scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}
        if self.vocab_parallel_embedding is None and self.vocab_size > 0:
            self.vocab_parallel_embedding = self.vocab_size >= 128000

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, params: dict[str, Any], **overrides: Any) -> "ModelArgs":
        """Known keys only: Meta's params.json files carry extras we do not need."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**params, **overrides}.items() if k in known and v is not None}
        return cls(**values)

    @classmethod
    def from_params_json(cls, path: str | Path, **overrides: Any) -> "ModelArgs":
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_params_json(self) -> dict[str, Any]:
        out = {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
               "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size, "multiple_of": self.multiple_of,
               "ffn_dim_multiplier": self.ffn_dim_multiplier, "hidden_dim": self.hidden_dim,
               "norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "use_scaled_rope": self.use_scaled_rope}
        if self.rope_scaling:
            out["rope_scaling"] = self.rope_scaling
        return out

    def tensor_parallel_problems(self, world_size: int) -> list[str]:
        """Why this shape cannot be split `world_size` ways (empty when it can)."""
        problems = []
        if self.n_heads % world_size:
            problems.append(f"n_heads={self.n_heads} is not divisible by {world_size}")
        kv = self.n_kv_heads
        if kv % world_size and world_size % kv:
            problems.append(f"n_kv_heads={kv} neither divides nor is divisible by {world_size}")
        if self.hidden_dim % world_size:
            problems.append(f"FFN hidden_dim={self.hidden_dim} is not divisible by {world_size}")
        if self.vocab_size % world_size:
            problems.append(f"vocab_size={self.vocab_size} is not divisible by {world_size}")
        if not self.vocab_parallel_embedding and self.dim % world_size:
            problems.append(f"dim={self.dim} is not divisible by {world_size}")
        return problems

    def valid_world_sizes(self) -> list[int]:
        return [w for w in range(1, self.n_heads + 1) if not self.tensor_parallel_problems(w)]

    def check_world_size(self, world_size: int) -> None:
        problems = self.tensor_parallel_problems(world_size)
        if problems:
            raise ValueError(
                f"This model cannot be split across {world_size} ranks: {'; '.join(problems)}. "
                f"Tensor-parallel sizes that work: {', '.join(map(str, self.valid_world_sizes()))}.")
