"""The Triton kernel and op behind kernels/invariant.py (imported by its load(), so Triton is imported only when a
model is given it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# One tile for every shape and row count: a tile's size decides the order in which an output's sum is taken, so
# no choice here may depend on the rows (an autotuner keyed on the shape would also make runs differ by its timings).
_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
_LAUNCH = {"num_warps": 4, "num_stages": 3}


@triton.jit
def _linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [M, N] = x [M, K] W^T for dense W [N, K]: each output's sum over K taken tile by tile in one order, whatever
    M is and wherever its row falls in a tile (rows past M are masked to zeros, which touch no other row's sums).
    IEEE: fp32 products in fp32 (a tensor-core product of fp32 would round its inputs to tf32)."""
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols < N)[:, None] & (ks < K)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@torch.library.triton_op("llama_dist::invariant_linear", mutates_args={})
def invariant_linear_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] contiguous, w [N, K] contiguous -> x w^T [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, _TILE["BLOCK_N"]), triton.cdiv(m, _TILE["BLOCK_M"]))
    torch.library.wrap_triton(_linear_kernel)[grid](x, w, y, m, n, k, IEEE=x.dtype == torch.float32, **_TILE,
                                                    **_LAUNCH)
    return y
