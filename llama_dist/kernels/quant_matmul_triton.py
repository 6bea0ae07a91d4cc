"""The Triton kernels and ops behind kernels/quant_matmul.py (imported by its load(), so Triton is imported only
when a model is given these kernels)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import INTERPRETED
from .gemv_triton import _exact_float

MAX_ROWS_BUCKET = 128  # autotuning keys on rows rounded up to a power of 2 up to this, so new batch sizes reuse a tuning


@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, ROWS_BUCKET,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [M, N] = x [M, K] W^T for int8 W [N, K] with one scale per row: integer tiles into a tensor-core product
    (in x's dtype; int8 values are exact in bf16), the scales applied to the finished sums."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols < N)[:, None] & (ks < K)[None, :], other=0)
        acc += tl.dot(x, tl.trans(_exact_float(w.to(tl.int32)).to(x.dtype)))
    acc = acc * tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def _fits(configs, named_args, **kwargs):
    """No more rows to a tile than the bucket needs."""
    rows = {**named_args, **kwargs}["ROWS_BUCKET"]
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, rows)] or configs[:1]


_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w in ((16, 64, 128, 4), (16, 128, 128, 4), (16, 64, 256, 4), (32, 64, 128, 4),
                                  (32, 128, 128, 4), (64, 64, 128, 4), (64, 128, 128, 8))
            for s in (3, 4)]
if INTERPRETED:  # the interpreter cannot time configs: one tile
    _int8_matmul, _FIXED = _int8_matmul_kernel, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}
else:
    _int8_matmul = triton.autotune(configs=_CONFIGS, key=["ROWS_BUCKET", "N", "K"],
                                   prune_configs_by={"early_config_prune": _fits})(_int8_matmul_kernel)
    _FIXED = {}


@torch.library.triton_op("llama_dist::int8_matmul", mutates_args={})
def int8_matmul_op(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> [M, N] through int8 q [N, K] with one scale per row [N]."""
    (m, k), n = x.shape, q.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bucket = min(MAX_ROWS_BUCKET, triton.next_power_of_2(m))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    torch.library.wrap_triton(_int8_matmul)[grid](x, q, scales, y, m, n, k, bucket, **_FIXED)
    return y
