"""Quantized weights that replace a layer's dense matrix: y = x W^T from int8 or int4 storage.

int8: symmetric, one scale per output channel. int4: asymmetric, a scale and a zero per group
of `group_size` inputs, value = (q - 8) * scale + zero, q in 0..15, which is exactly the form of
GGUF's Q4_0, Q4_1 and Q4_K blocks, so those load without requantization.

Kernels: PyTorch's packed matmuls with bf16 activations (`_weight_int8pack_mm` on CPU,
`_weight_int4pack_mm[_for_cpu]` on CPU and CUDA); int8 on GPUs dequantizes inside the matmul,
which the compiled decode step fuses; elsewhere the matrix is dequantized on the fly. Quantization happens after sharding, on each rank's own slice.
"""
from __future__ import annotations

import torch
from torch import nn

QUANT_TYPES = ("int8", "int4")


class QuantizedWeight(nn.Module):
    """Called on activations x [..., in]: returns x W^T [..., out]."""

    out_features: int
    in_features: int


class Int8Weight(QuantizedWeight):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.act_dtype = act_dtype
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scales", scales.to(act_dtype).contiguous())

    @classmethod
    def quantize(cls, w: torch.Tensor, act_dtype: torch.dtype) -> "Int8Weight":
        return cls(*int8_quantize(w), act_dtype)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.float()[:, None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantized matrix: an int8 embedding table looked up without expanding it."""
        return self.q[ids].float() * self.scales[ids, None].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.act_dtype), self.q, self.scales)
            return y.reshape(*shape[:-1], -1).to(x.dtype)
        # On GPUs the compiled decode step fuses this dequantization into the matmul (PyTorch's packed
        # int8 CUDA kernel measured 10x slower than bf16 at batch 1 on an H100).
        return torch.nn.functional.linear(x, self.q.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Weight(QuantizedWeight):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 act_dtype: torch.dtype):
        """q [out, in] in 0..15; scales, zeros [out, in / group_size]."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size, self.act_dtype = group_size, act_dtype
        self.device_type = q.device.type
        q = q.to(torch.int32)
        if self.device_type == "cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        elif self.device_type == "cuda":
            packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        else:
            packed = q.to(torch.uint8)
        self.register_buffer("packed", packed)
        # The kernels want [groups, out, 2] of (scale, zero) in the activation dtype.
        self.register_buffer("scales_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1)
                             .to(act_dtype).contiguous())

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int, act_dtype: torch.dtype) -> "Int4Weight":
        return cls(*int4_quantize(w, group_size), group_size, act_dtype)

    def _dense(self) -> torch.Tensor:
        """Devices without a packed kernel keep q unpacked and dequantize on the fly."""
        sz = self.scales_zeros.float().transpose(0, 1)  # [out, groups, 2]
        return int4_dequantize(self.packed, sz[..., 0], sz[..., 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.act_dtype)
        if self.device_type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        elif self.device_type == "cuda":
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_zeros)
        else:
            y = x2 @ self._dense().to(x2.dtype).t()
        return y.reshape(*shape[:-1], -1).to(x.dtype)


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric, one scale per output row: (q int8 [out, in], scales [out])."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def int4_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max asymmetric groups along the input dim: (q [out, in] in 0..15, scales, zeros [out, groups])."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"int4 groups of {group_size} do not divide this shard's {in_f} inputs; "
                         "choose a group size that divides it (32, 64 or 128).")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15)
    zeros = lo + 8 * scales  # value = (q - 8) * scale + zero
    return q.reshape(out_f, in_f).to(torch.int32), scales, zeros


def int4_dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    g = q.float().reshape(out_f, scales.shape[1], -1)
    return ((g - 8) * scales[..., None] + zeros[..., None]).reshape(out_f, in_f)


def quantize_weight(w: torch.Tensor, kind: str, group_size: int, act_dtype: torch.dtype) -> QuantizedWeight:
    if kind == "int8":
        return Int8Weight.quantize(w, act_dtype)
    if kind == "int4":
        return Int4Weight.quantize(w, group_size, act_dtype)
    raise ValueError(f"Unknown quantization {kind!r}; choose one of {', '.join(QUANT_TYPES)}.")


def quantized_from_shards(shards: list, act_dtype: torch.dtype, device) -> QuantizedWeight:
    """A weight from stored quantized slices (QuantizedShard), concatenated along the output dim."""
    kind = shards[0].kind
    q = torch.cat([s.q for s in shards]).to(device)
    scales = torch.cat([s.scales for s in shards]).to(device)
    if kind == "int8":
        return Int8Weight(q, scales, act_dtype)
    zeros = torch.cat([s.zeros for s in shards]).to(device)
    return Int4Weight(q, scales, zeros, shards[0].group_size, act_dtype)
