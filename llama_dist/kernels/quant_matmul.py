"""Quantized weights' products on CUDA through our Triton kernels, installed over quant/weights.Int8Weight and
Int4Weight. One row goes through the one-row kernel (gemv.py, which the fused decode block also calls with its
norms and residuals folded in). A prompt's rows (many) go through the matrix dequantized by one Triton kernel
into a scratch copy, then cuBLAS: there the product's arithmetic outweighs the conversion, and cuBLAS's
bf16 GEMM is faster than a tensor-core kernel converting tiles in registers or PyTorch's int4 kernel
(benchmarks/RESULTS.md, "Quantized prompts"); int8 up to a few hundred rows, where writing the copy costs more
than cuBLAS saves, goes through our TMA kernel instead (int8_rows). A decode step's few rows (up to DOT_ROWS): our
tensor-core kernel, which converts weight tiles in registers, so a batch reads the quantized weights once, as one
row does (int4 in bf16 two values at a time, without a conversion instruction: quant_matmul_triton.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..quant.weights import Int4Weight, Int8Weight
from . import gemv

DOT_ROWS = 64  # up to this many rows the tensor-core kernel; more: the dequantized matrix and cuBLAS


@functools.cache
def load() -> bool:
    """Define the kernels and their ops (Triton imported only now). False where Triton is missing."""
    if not gemv.load():
        return False
    from . import quant_matmul_triton  # noqa: F401  (registers llama_dist::int8_matmul, ::int4_matmul, ::int8_rows,
    # ::dequantize)
    return True


class TritonInt8Weight(Int8Weight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.act_dtype)
        if flat.shape[0] == 1:
            y = gemv.gemv(flat, self.q, self.scales)
        elif flat.shape[0] <= DOT_ROWS:
            y = torch.ops.llama_dist.int8_matmul(flat.contiguous(), self.q, self.scales)
        else:
            y = torch.ops.llama_dist.int8_rows(flat.contiguous(), self.q, self.scales)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class TritonInt4Weight(Int4Weight):
    """int4 groups of 32 on CUDA (those with words)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.act_dtype)
        if flat.shape[0] == 1:
            y = gemv.gemv(flat, self.words, self.scales_zeros)
        elif flat.shape[0] <= DOT_ROWS:
            y = torch.ops.llama_dist.int4_matmul(flat.contiguous(), self.words, self.scales_zeros)
        else:
            y = F.linear(flat, torch.ops.llama_dist.dequantize(self.words, self.scales_zeros, flat.dtype))
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)
