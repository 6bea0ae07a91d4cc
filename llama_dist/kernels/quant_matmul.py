"""Quantized weights' products on CUDA through our Triton kernels, installed over quant/weights' modules (which
on their own dequantize on the fly): one row through the one-row kernel (gemv.py, which the fused decode block
also calls with its norms and residuals folded in), a few rows through a tensor-core kernel that dequantizes
weight tiles in registers (a decode step of a batch reads the weights once, as one row does), and a long
prompt's rows through the dense matrix, dequantized by a kernel into a scratch tensor, and cuBLAS (the
product's arithmetic then outweighs reading the matrix twice)."""
from __future__ import annotations

import functools

import torch

from ..quant.weights import Int4Weight, Int8Weight
from . import gemv

DOT_ROWS = 64  # up to this many rows the tensor-core kernel; more: dequantize, then cuBLAS


@functools.cache
def load() -> bool:
    """Define the kernels and their ops (Triton imported only now). False where Triton is missing."""
    if not gemv.load():
        return False
    from . import quant_matmul_triton  # noqa: F401  (registers llama_dist::quant_matmul and ::dequantize)
    return True


def supports(weight: torch.nn.Module) -> bool:
    """Whether the kernels read this quantized weight as stored."""
    from .gemv_triton import INT4_GROUPS
    if isinstance(weight, Int4Weight):
        return weight.layout == "words" and weight.group_size in INT4_GROUPS
    return isinstance(weight, Int8Weight)


def quantized_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, int4: bool) -> torch.Tensor:
    """x [..., in] -> x W^T [..., out] for int4 words and groups or int8 and row scales (in x's dtype)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1:
        y = gemv.gemv(flat, w, groups=scales) if int4 else gemv.gemv(flat, w, scales)
    elif flat.shape[0] <= DOT_ROWS:
        y = torch.ops.llama_dist.quant_matmul(flat.contiguous(), w, scales, int4)
    else:
        y = torch.nn.functional.linear(flat, torch.ops.llama_dist.dequantize(w, scales, flat.shape[1], int4, flat.dtype))
    return y.reshape(*x.shape[:-1], -1)


class TritonInt4Weight(Int4Weight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x.to(self.act_dtype), self.words, self.scale_min, int4=True).to(x.dtype)


class TritonInt8Weight(Int8Weight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x.to(self.act_dtype), self.q, self.scales, int4=False).to(x.dtype)
