"""The Triton kernels and ops behind kernels/quant_matmul.py (imported by its load(), so Triton is imported only
when a model is given these kernels)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import INTERPRETED
from .gemv_triton import INT4_GROUPS, _exact_float

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


@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, sm_ptr, y_ptr, M, N, K, ROWS_BUCKET, GROUP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y [M, N] = x [M, K] W^T for int4 words (quant/weights.int4_words): each group's nibbles, small integers
    exact in x's dtype, into a tensor-core product, then scale * sum + min * sum(x) per group."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < N
    tiles = tl.cdiv(K, 8 * GROUP)
    j = tl.arange(0, GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tiles):
        w = tl.load(w_ptr + cols[:, None] * (tiles * GROUP) + t * GROUP + j[None, :], mask=col_ok[:, None], other=0)
        for i in tl.static_range(8):
            ks = (8 * t + i) * GROUP + j
            x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :],
                        other=0.0)
            dot = tl.dot(x, tl.trans(_exact_float((w >> (4 * i)) & 0xF).to(x.dtype)))
            at = (cols * (tiles * 8) + 8 * t + i) * 2
            scale = tl.load(sm_ptr + at, mask=col_ok, other=0.0).to(tl.float32)
            low = tl.load(sm_ptr + at + 1, mask=col_ok, other=0.0).to(tl.float32)
            acc += dot * scale[None, :] + tl.sum(x.to(tl.float32), axis=1)[:, None] * low[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & col_ok[None, :])


@triton.jit
def _dequantize_int4_kernel(w_ptr, sm_ptr, y_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The whole int4 matrix [N, K] in y's dtype, a tile of 8 groups per program, for a long prompt's cuBLAS product."""
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    t = tl.program_id(1)
    tiles = tl.cdiv(K, 8 * GROUP)
    j = tl.arange(0, GROUP)
    w = tl.load(w_ptr + cols[:, None] * (tiles * GROUP) + t * GROUP + j[None, :], mask=(cols < N)[:, None], other=0)
    for i in tl.static_range(8):
        at = (cols * (tiles * 8) + 8 * t + i) * 2
        scale = tl.load(sm_ptr + at, mask=cols < N, other=0.0).to(tl.float32)
        low = tl.load(sm_ptr + at + 1, mask=cols < N, other=0.0).to(tl.float32)
        ks = (8 * t + i) * GROUP + j
        values = _exact_float((w >> (4 * i)) & 0xF) * scale[:, None] + low[:, None]
        tl.store(y_ptr + cols[:, None] * K + ks[None, :], values.to(y_ptr.dtype.element_ty),
                 mask=(cols < N)[:, None] & (ks < K)[None, :])


@triton.jit
def _dequantize_int8_kernel(w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole int8 matrix times its row scales, in y's dtype."""
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (cols < N)[:, None] & (ks < K)[None, :]
    w = _exact_float(tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=ok, other=0).to(tl.int32))
    scale = tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols[:, None] * K + ks[None, :], (w * scale[:, None]).to(y_ptr.dtype.element_ty), mask=ok)


def _fits(configs, named_args, **kwargs):
    """No more rows to a tile than the bucket needs."""
    rows = {**named_args, **kwargs}["ROWS_BUCKET"]
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, rows)] or configs[:1]


_INT8_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bm, bn, bk, w in ((16, 64, 128, 4), (16, 128, 128, 4), (16, 64, 256, 4), (32, 64, 128, 4),
                                       (32, 128, 128, 4), (64, 64, 128, 4), (64, 128, 128, 8))
                 for s in (3, 4)]
_INT4_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                 for bm, bn, w in ((16, 32, 4), (16, 64, 4), (16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4),
                                   (64, 128, 8))
                 for s in (2, 3)]
if INTERPRETED:  # the interpreter cannot time configs: one tile
    _int8_matmul, _int4_matmul = _int8_matmul_kernel, _int4_matmul_kernel
    _FIXED_INT8, _FIXED_INT4 = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, {"BLOCK_M": 16, "BLOCK_N": 16}
else:
    _int8_matmul = triton.autotune(configs=_INT8_CONFIGS, key=["ROWS_BUCKET", "N", "K"],
                                   prune_configs_by={"early_config_prune": _fits})(_int8_matmul_kernel)
    _int4_matmul = triton.autotune(configs=_INT4_CONFIGS, key=["ROWS_BUCKET", "N", "K", "GROUP"],
                                   prune_configs_by={"early_config_prune": _fits})(_int4_matmul_kernel)
    _FIXED_INT8, _FIXED_INT4 = {}, {}


def _int4_group(w: torch.Tensor, scale_min: torch.Tensor) -> int:
    group = w.shape[1] * 8 // scale_min.shape[1]
    assert group in INT4_GROUPS, group
    return group


@torch.library.triton_op("llama_dist::quant_matmul", mutates_args={})
def quant_matmul_op(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, int4: bool) -> torch.Tensor:
    """x [M, K] -> [M, N] through int4 words with their (scale, min) pairs (quant/weights.int4_words), or int8
    [N, K] with one scale per row [N]."""
    (m, k), n = x.shape, w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bucket = min(MAX_ROWS_BUCKET, triton.next_power_of_2(m))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    if int4:
        torch.library.wrap_triton(_int4_matmul)[grid](x, w, scales, y, m, n, k, bucket, GROUP=_int4_group(w, scales),
                                                      **_FIXED_INT4)
    else:
        torch.library.wrap_triton(_int8_matmul)[grid](x, w, scales, y, m, n, k, bucket, **_FIXED_INT8)
    return y


@torch.library.triton_op("llama_dist::dequantize", mutates_args={})
def dequantize_op(w: torch.Tensor, scales: torch.Tensor, k: int, int4: bool, dtype: torch.dtype) -> torch.Tensor:
    """The dense matrix [N, k] in dtype, from int4 words and their pairs or int8 and row scales."""
    n = w.shape[0]
    y = torch.empty((n, k), dtype=dtype, device=w.device)
    if int4:
        group = _int4_group(w, scales)
        torch.library.wrap_triton(_dequantize_int4_kernel)[(triton.cdiv(n, 32), triton.cdiv(k, 8 * group))](
            w, scales, y, n, k, GROUP=group, BLOCK_N=32)
    else:
        torch.library.wrap_triton(_dequantize_int8_kernel)[(triton.cdiv(n, 32), triton.cdiv(k, 128))](
            w, scales, y, n, k, BLOCK_N=32, BLOCK_K=128)
    return y
