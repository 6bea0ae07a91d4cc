"""One decoded token's matrix-vector products on CUDA, in Triton: y = x W^T for a single row x,
with the layer's neighbouring element-wise work folded in.

Batch-1 decoding reads every weight once per token, so its speed is the read bandwidth these
products reach, which general matmuls (cuBLAS, inductor's reductions) fall short of for one row
(benchmarks/RESULTS.md, "Fused decode kernels"). This kernel streams W in [BLOCK_N, BLOCK_K] tiles with
pipelined loads, dequantizing int8 rows (one scale per row) in registers, and sums in fp32. Tile
sizes are autotuned per shape. Rows > 1 keep the other paths; int4 keeps PyTorch's packed kernel
(an int4 variant here was slower, RESULTS.md).

A decode step's other kernels (RMSNorm, SwiGLU, residual adds) each cost a launch and a few
microseconds for a few kilobytes; here they cost nothing:
- RMSNorm before the product: x * g per column as x streams in, its sum of squares in the same loop,
  and the 1/rms factor applied to the finished sums (it is one scalar per row of x);
- SwiGLU: x holds [gate, up] and the product's input is silu(gate) * up, computed as it streams;
- a residual added to the output.
"""
from __future__ import annotations

import functools
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: how CI checks our kernels


def bf16_tensor_cores() -> bool:
    """Whether attention kernels' bf16 tensor-core products (tl.dot) run here: GPUs from Ampere (sm_80) on, or
    Triton's interpreter; without a GPU, where the kernels are not used, this does not object."""
    return INTERPRETED or not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0)


@functools.cache
def load() -> bool:
    """Define the kernel and its op when a model is given this kernel (importing Triton takes seconds,
    which CPU runs should not pay). False where Triton is missing (the dense and packed paths serve)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False

    _CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn, bk, w in ((2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4),
                                  (16, 256, 8), (16, 512, 8))
                for s in (2, 4)]

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, g_ptr, r_ptr, y_ptr, N, K, eps,
                     SCALED: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """W [N, K] dense, or int8 times one scale per row s[N] when SCALED. NORM: x is RMS-normalised
        with weight g[K]; GATED: x is [gate, up] of 2K and the input is silu(gate) * up; RESIDUAL: y += r."""
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (cols < K)[None, :]
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0)
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            if GATED:
                up = tl.load(x_ptr + K + cols, mask=cols < K, other=0.0).to(tl.float32)
                x = x * tl.sigmoid(x) * up
            if NORM:
                squares += x * x
                x = x * tl.load(g_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if NORM:
            y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if SCALED:
            y = y * tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if RESIDUAL:
            y = y + tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    if INTERPRETED:  # the interpreter cannot time configs: one tile
        _gemv = _gemv_kernel
        _FIXED = {"BLOCK_N": 8, "BLOCK_K": 64}
    else:
        _gemv = triton.autotune(configs=_CONFIGS, key=["N", "K", "SCALED", "NORM", "GATED", "RESIDUAL"])(_gemv_kernel)
        _FIXED = {}

    @torch.library.triton_op("llama_dist::gemv", mutates_args={})
    def gemv_op(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, norm_weight: torch.Tensor,
                residual: torch.Tensor, eps: float, scaled: bool, norm: bool, gated: bool,
                add: bool) -> torch.Tensor:
        """x [1, in] (or [1, 2 * in] when gated) -> [1, out]. Tensors whose flag is off are unused."""
        n, k = w.shape
        y = torch.empty((1, n), dtype=x.dtype, device=x.device)
        torch.library.wrap_triton(_gemv)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            x, w, scales, norm_weight, residual, y, n, k, eps,
            SCALED=scaled, NORM=norm, GATED=gated, RESIDUAL=add, **_FIXED)
        return y

    return True


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] with one row -> [..., out]: x W^T, times `scales` per output row for int8 W.

    norm_weight: RMS-normalise x first (with eps); gated: x is [gate, up] and the input silu(gate) * up;
    residual [..., out]: added to the result."""
    flat = x.reshape(1, -1)
    y = torch.ops.llama_dist.gemv(
        flat, w, flat if scales is None else scales, flat if norm_weight is None else norm_weight,
        flat if residual is None else residual.reshape(1, -1), eps,
        scales is not None, norm_weight is not None, gated, residual is not None)
    return y.reshape(*x.shape[:-1], -1)
