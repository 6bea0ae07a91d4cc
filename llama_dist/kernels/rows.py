"""A decode step's element-wise work for several rows on CUDA, in Triton: RMSNorm and SwiGLU's
silu(gate) * up, one kernel each.

For one row the matrix-vector kernel (gemv.py) folds this work into the products. For a batch the
products are cuBLAS matmuls, and PyTorch runs an RMSNorm as six kernels and SwiGLU as three; inside a
CUDA graph each still costs a few microseconds, about a millisecond per step over a 7B model's layers.
Each kernel here rounds where the PyTorch modules round (the normalised rows to the activation dtype
before the weight; silu(gate) before the product), so it computes what they compute.
"""
from __future__ import annotations

import functools

import torch

from .gemv import INTERPRETED

SILU_BLOCK = 64 if INTERPRETED else 1024


_KERNELS: dict = {}  # the Triton kernels, once load() has defined them


@functools.cache
def load() -> bool:
    """Define the kernels and their ops (importing Triton takes seconds, which CPU runs should not pay).
    False where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, K, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < K
        x = tl.load(x_ptr + row * K + cols, mask=ok, other=0.0).to(tl.float32)
        scale = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        normed = (x * scale).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * K + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(x_ptr, y_ptr, H, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        gate = tl.load(x_ptr + row * 2 * H + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * H + H + cols, mask=ok, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (act * up).to(y_ptr.dtype.element_ty), mask=ok)

    _KERNELS.update(rms_norm=_rms_norm_kernel, silu_mul=_silu_mul_kernel, next_power_of_2=triton.next_power_of_2,
                    cdiv=triton.cdiv)

    @torch.library.triton_op("llama_dist::rms_norm_rows", mutates_args={})
    def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [rows, K] contiguous -> RMSNorm(x) * weight."""
        rows, k = x.shape
        y = torch.empty_like(x)
        torch.library.wrap_triton(_rms_norm_kernel)[(rows,)](x, weight, y, k, eps,
                                                              BLOCK=triton.next_power_of_2(k))
        return y

    @torch.library.triton_op("llama_dist::silu_mul_rows", mutates_args={})
    def silu_mul_op(x: torch.Tensor) -> torch.Tensor:
        """x [rows, 2H] = [gate, up] contiguous -> silu(gate) * up [rows, H]."""
        rows, h = x.shape[0], x.shape[1] // 2
        y = torch.empty((rows, h), dtype=x.dtype, device=x.device)
        torch.library.wrap_triton(_silu_mul_kernel)[(rows, triton.cdiv(h, SILU_BLOCK))](x, y, h, BLOCK=SILU_BLOCK)
        return y

    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x [..., K], times weight [K] (as model.transformer.RMSNorm)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.llama_dist.rms_norm_rows(flat, weight, eps).view(x.shape)
    # eager (a prompt pass, or a step being captured): the kernel launched directly, without the op's
    # dispatch, which costs more than the kernel
    y = torch.empty_like(flat)
    _KERNELS["rms_norm"][(flat.shape[0],)](flat, weight, y, flat.shape[1], eps,
                                           BLOCK=_KERNELS["next_power_of_2"](flat.shape[1]))
    return y.view(x.shape)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of each row of x [..., 2H] = [gate, up] -> [..., H]."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.llama_dist.silu_mul_rows(flat).view(*x.shape[:-1], -1)
    rows, h = flat.shape[0], flat.shape[1] // 2
    y = torch.empty((rows, h), dtype=x.dtype, device=x.device)
    block = SILU_BLOCK
    _KERNELS["silu_mul"][(rows, _KERNELS["cdiv"](h, block))](flat, y, h, BLOCK=block)
    return y.view(*x.shape[:-1], -1)
