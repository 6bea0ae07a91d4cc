"""The Triton kernels and ops behind kernels/gemv.py (imported by its load(): Triton is imported only when a model
is given these kernels)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import INTERPRETED

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w in ((2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4),
                              (16, 256, 8), (16, 512, 8))
            for s in (2, 4)]


@triton.jit
def _exact_float(v):
    """Integers |v| < 2^22 (int32) to fp32 exactly, in an integer add and a float subtraction."""
    return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


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
        acc += (_exact_float(w.to(tl.int32)) if SCALED else w.to(tl.float32)) * x[None, :]
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    if SCALED:
        y = y * tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = y + tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


if INTERPRETED:  # the interpreter cannot time configs: one tile
    _gemv, _FIXED = _gemv_kernel, {"BLOCK_N": 8, "BLOCK_K": 64}
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
