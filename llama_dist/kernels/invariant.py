"""Batch-invariant kernels on CUDA: a row's results do not depend on which other rows share its batch.

cuBLAS picks its algorithm (tiles, split-K) by the number of rows, our one-row kernel sums in another order than a
matmul, and PyTorch's reductions split a row's sum differently for few rows than for many; each changes a row's
last bits with its batch, and greedy choices at near-ties follow. A server's answer then depends on what else
was running. Installed as a transform (kernels.install, with Kernels.batch_invariant), this model's products
take one Triton matmul with one fixed tile for every shape (invariant_triton.py), its norms the row kernel
(rows.py), its decode attention the per-row kernel (decode_attention.py); the one-row kernel is not used, and a
server does not fold decode rows into prompt passes (serving/engine.py), whose attention is another kernel.
Costs (benchmarks/RESULTS.md): the fixed tile is slower than cuBLAS's choice, most for prompts, and batch 1
loses the one-row kernel. Dense weights only. Across tensor-parallel ranks the all-reduces' sums hold for two ranks (a + b
in either order); with more, NCCL's algorithm, which it picks by message size, orders them.

On CPUs the block kernels of quantized weights already sum each row alone (tests/test_server.py), but dense
weights multiply through BLAS, whose sums depend on the batch: there the mode only checks that no weight is dense.
"""
from __future__ import annotations

import functools

import torch

from ..model.transformer import RMSNorm
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from . import rows


@functools.cache
def load() -> bool:
    """Define the kernel and its op (Triton imported only now). False where Triton is missing."""
    try:
        from . import invariant_triton  # noqa: F401  (registers llama_dist::invariant_linear)
    except ImportError:
        return False
    return rows.load()


def check_without_kernels(model: torch.nn.Module, device: torch.device) -> None:
    """Batch invariance asked of a model not given these kernels: refuse what cannot be batch-invariant."""
    if device.type == "cuda":
        raise ValueError("Batch invariance on CUDA needs the batch-invariant kernels (Kernels(batch_invariant=True)), "
                         "and other kernels were given.")
    if device.type != "cpu":
        raise ValueError(f"Batch-invariant kernels exist for CUDA and CPUs, not {device.type}.")
    if any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.qweight is None for m in model.modules()):
        raise ValueError("Batch invariance on CPUs: dense weights multiply through BLAS, whose sums depend on the "
                         "batch; load a GGUF file's quantized weights (--quantize auto, the default), whose block "
                         "kernels sum each row alone.")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] W^T, each row's sums taken in one order whatever the batch."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.llama_dist.invariant_linear(flat, weight.contiguous()).view(*x.shape[:-1], -1)


class InvariantColumnParallelLinear(ColumnParallelLinear):
    dense_product = staticmethod(linear)


class InvariantRowParallelLinear(RowParallelLinear):
    dense_product = staticmethod(linear)


class RowKernelRMSNorm(RMSNorm):
    """The model's last norm through the row kernel, one program per row (the blocks' norms already are)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rows.rms_norm(x, self.weight, self.eps)
