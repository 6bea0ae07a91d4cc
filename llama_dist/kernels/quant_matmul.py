"""int8 weights' products on CUDA through our Triton kernels, installed over quant/weights.Int8Weight (which on
its own converts the matrix on every call): one row through the one-row kernel (gemv.py, which the fused decode
block also calls with its norms and residuals folded in); a decode step of a few rows through a tensor-core
kernel that converts weight tiles in registers, so a batch reads the int8 weights once, as one row does; a long
prompt's rows through the converted matrix and cuBLAS (there the product's arithmetic outweighs the conversion:
benchmarks/RESULTS.md, "Quantized GPU kernels").

int4 takes PyTorch's packed CUDA kernel for several rows (ours were slower: same section); one row goes through
the one-row kernel (gemv.py), which reads int4 words.
"""
from __future__ import annotations

import functools

import torch

from ..quant.weights import Int8Weight
from . import gemv

DOT_ROWS = 64  # up to this many rows the tensor-core kernel; more: the converted matrix and cuBLAS


@functools.cache
def load() -> bool:
    """Define the kernels and their ops (Triton imported only now). False where Triton is missing."""
    if not gemv.load():
        return False
    from . import quant_matmul_triton  # noqa: F401  (registers llama_dist::int8_matmul)
    return True


class TritonInt8Weight(Int8Weight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.act_dtype)
        if flat.shape[0] == 1:
            y = gemv.gemv(flat, self.q, self.scales)
        elif flat.shape[0] <= DOT_ROWS:
            y = torch.ops.llama_dist.int8_matmul(flat.contiguous(), self.q, self.scales)
        else:
            return super().forward(x)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)
