"""The interface every checkpoint format implements: a ModelArgs plus per-rank slices by canonical name."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import torch

from ..model.args import ModelArgs
from ..quant.ggml import as_q4_1_rows, dequantize_rows, int4_groups_rows
from ..quant.weights import int4_dequantize, int8_quantize, q8_0_quantize
from .shard import ShardLayout


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given; the message says what is wrong and what to do."""


@dataclass
class QuantizedShard:
    """A rank's slice of a weight as stored quantized: int8 (q, per-row scales), int4 (q, scales, zeros), or
    "q8_0" / "q4_1" / "q4_0": q is the GGUF blocks' bytes, rows [out, blocks * bytes per block], or "ggml": the bytes of
    another GGML type (ggml_type) that no kernel reads as stored."""

    kind: str
    q: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group_size: int = 0
    ggml_type: str = ""

    def as_int4(self) -> "QuantizedShard":
        """Q4_1 or Q4_0 bytes as int4 groups, to join other int4 slices in one fused matrix."""
        if self.kind not in ("q4_1", "q4_0"):
            return self
        return QuantizedShard("int4", *int4_groups_rows(self.as_q4_1().q), group_size=32)

    def as_q4_1(self) -> "QuantizedShard":
        """Q4_0 bytes as Q4_1 bytes (m = -8 d, exact), to join Q4_1 slices in one fused matrix."""
        return QuantizedShard("q4_1", as_q4_1_rows(self.q, "Q4_0"), group_size=32) if self.kind == "q4_0" else self

    def as_q8_0(self) -> "QuantizedShard":
        """Requantized as Q8_0 blocks (8 bits and a scale per 32 weights, what the CPU block kernel reads): for
        the GGML types without a kernel of their own (Q6_K, Q5_K, ...), for the parts of a fused matrix stored in
        different types (Q4_K_M files give attn_v more bits than attn_q), and for 4-bit embedding tables (looked
        up by row). The values move by at most half a step of 8 bits per block, finer than the 4-6 bit sources."""
        return self if self.kind == "q8_0" else QuantizedShard("q8_0", q8_0_quantize(self.values()), group_size=32)

    def as_int8(self) -> "QuantizedShard":
        """Requantized as int8 with one scale per row: what as_q8_0 is for devices without the CPU block kernels
        (GPUs, whose int8 kernels read this), so such weights stay 8-bit instead of loading dense. The values
        move by at most half a step of 8 bits over the row's largest value."""
        return self if self.kind == "int8" else QuantizedShard("int8", *int8_quantize(self.values()))

    def values(self) -> torch.Tensor:
        """The weights this slice stores, float32 [out, in]."""
        if self.kind == "ggml":
            return dequantize_rows(self.q, self.ggml_type)
        if self.kind in ("q4_1", "q4_0", "q8_0"):
            return dequantize_rows(self.q, self.kind.upper())
        if self.kind == "int4":
            return int4_dequantize(self.q, self.scales, self.zeros)
        return self.q.float() * self.scales.float()[:, None]


class CheckpointSource(Protocol):
    format: str
    args: ModelArgs

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        """The `layout` slice of canonical parameter `name`, reading as little of the file as possible."""
        ...

    def tensor_types(self) -> dict[str, int]:
        """Stored element type -> number of tensors (for `info`)."""
        ...

    # Optional: read_quantized(name, layout) -> QuantizedShard | None, for weights stored quantized.


def count_types(types: Iterable[Any]) -> dict[str, int]:
    return dict(Counter(str(t).removeprefix("torch.") for t in types))


class StateDictSource:
    """An in-memory state dict of full tensors in canonical names (random-weight models, tests)."""

    format = "state_dict"

    def __init__(self, args: ModelArgs, state_dict: dict[str, torch.Tensor]):
        self.args, self.state_dict = args, state_dict

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        return layout.take(self.state_dict[name])

    def tensor_types(self) -> dict[str, int]:
        return count_types(t.dtype for t in self.state_dict.values())


class RandomSource:
    """Random weights of a given shape, made on the target device (benchmarks: speed does not depend on
    values). Each full tensor is drawn from a generator seeded by its name, then sliced, so every
    tensor-parallel size sees the same model."""

    format = "random"

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        self.args, self.device, self.dtype, self.seed = args, device, dtype, seed

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        from .shard import full_shape

        shape = full_shape(name, self.args)
        g = torch.Generator(device=self.device).manual_seed(self.seed + sum(map(ord, name)) * 7919)
        if len(shape) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        full = torch.randn(shape, generator=g, device=self.device, dtype=self.dtype) * shape[1] ** -0.5
        return layout.take(full).clone()

    def tensor_types(self) -> dict[str, int]:
        return {str(self.dtype).removeprefix("torch."): 0}
