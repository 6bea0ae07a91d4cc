"""A decode step's element-wise work for several rows on CUDA, in Triton: RMSNorm, SwiGLU's
silu(gate) * up, and the rotary embedding of q and k with the cache write of k and v, one kernel each.

For one row the matrix-vector kernel (gemv.py) folds this work into the products. For a batch the
products are cuBLAS matmuls, and PyTorch runs an RMSNorm as six kernels and SwiGLU as three; inside a
CUDA graph each still costs a few microseconds, about a millisecond per step over a 7B model's layers.
Each kernel here rounds where the PyTorch modules round (the normalised rows to the activation dtype
before the weight; silu(gate) before the product), so it computes what they compute. The rotary kernel
replaces two dozen small operations per layer of a prompt pass, whose time on the CPU exceeds the GPU's.
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

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, rope_ptr, table_ptr, rows_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, stride_block,
                           stride_head, stride_pos, stride_t, N_HEADS: tl.constexpr, N_KV: tl.constexpr,
                           HALF: tl.constexpr, KV_BLOCK: tl.constexpr):
        """Program (token t, head h): q head h rotated into q[t] (h < N_HEADS), or kv head h - N_HEADS: k rotated
        and v written to the paged caches at (cache row rows[t], position pos[t]) through the block table.
        Meta's interleaved pairs (x[2i], x[2i+1])."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        i = tl.arange(0, HALF)
        width = (N_HEADS + 2 * N_KV) * 2 * HALF
        cos = tl.load(rope_ptr + t * 2 * HALF + 2 * i)
        sin = tl.load(rope_ptr + t * 2 * HALF + 2 * i + 1)
        x_at = qkv_ptr + t * width + h * 2 * HALF
        x0 = tl.load(x_at + 2 * i).to(tl.float32)
        x1 = tl.load(x_at + 2 * i + 1).to(tl.float32)
        y0, y1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        if h < N_HEADS:
            out = q_ptr + t * N_HEADS * 2 * HALF + h * 2 * HALF
            tl.store(out + 2 * i, y0.to(q_ptr.dtype.element_ty))
            tl.store(out + 2 * i + 1, y1.to(q_ptr.dtype.element_ty))
        else:
            p = tl.load(pos_ptr + t)
            block = tl.load(table_ptr + tl.load(rows_ptr + t) * stride_t + p // KV_BLOCK)
            at = block * stride_block + (h - N_HEADS) * stride_head + (p % KV_BLOCK) * stride_pos
            tl.store(k_ptr + at + 2 * i, y0.to(k_ptr.dtype.element_ty))
            tl.store(k_ptr + at + 2 * i + 1, y1.to(k_ptr.dtype.element_ty))
            v_at = x_at + N_KV * 2 * HALF
            tl.store(v_ptr + at + 2 * i, tl.load(v_at + 2 * i))
            tl.store(v_ptr + at + 2 * i + 1, tl.load(v_at + 2 * i + 1))

    _KERNELS.update(rms_norm=_rms_norm_kernel, silu_mul=_silu_mul_kernel, rope_cache=_rope_cache_kernel)

    # the same launches as ops, for compiled code (torch.compile traces ops, not bare kernels)
    @torch.library.triton_op("llama_dist::rope_cache_rows", mutates_args={"cache_k", "cache_v"})
    def rope_cache_op(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      block_table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, n_heads: int) -> torch.Tensor:
        return _launch_rope_cache(torch.library.wrap_triton(_rope_cache_kernel), qkv, rope, cache_k, cache_v,
                                  block_table, rows, pos, n_heads)

    @torch.library.triton_op("llama_dist::rms_norm_rows", mutates_args={})
    def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _launch_rms_norm(torch.library.wrap_triton(_rms_norm_kernel), x, weight, eps)

    @torch.library.triton_op("llama_dist::silu_mul_rows", mutates_args={})
    def silu_mul_op(x: torch.Tensor) -> torch.Tensor:
        return _launch_silu_mul(torch.library.wrap_triton(_silu_mul_kernel), x)

    return True


def _launch_rms_norm(kernel, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, K] contiguous -> RMSNorm(x) * weight."""
    y = torch.empty_like(x)
    kernel[(x.shape[0],)](x, weight, y, x.shape[1], eps, BLOCK=1 << (x.shape[1] - 1).bit_length())
    return y


def _launch_silu_mul(kernel, x: torch.Tensor) -> torch.Tensor:
    """x [rows, 2H] = [gate, up] contiguous -> silu(gate) * up [rows, H]."""
    rows, h = x.shape[0], x.shape[1] // 2
    y = torch.empty((rows, h), dtype=x.dtype, device=x.device)
    kernel[(rows, -(-h // SILU_BLOCK))](x, y, h, BLOCK=SILU_BLOCK)
    return y


def _launch_rope_cache(kernel, qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                       block_table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, n_heads: int) -> torch.Tensor:
    """rope_and_cache's arguments flattened to tokens -> the rotated queries [tokens, n_heads * head_dim]."""
    q = torch.empty((qkv.shape[0], n_heads * cache_k.shape[3]), dtype=qkv.dtype, device=qkv.device)
    kernel[(qkv.shape[0], n_heads + cache_k.shape[1])](
        qkv, rope, block_table, rows, pos, q, cache_k, cache_v, cache_k.stride(0), cache_k.stride(1),
        cache_k.stride(2), block_table.stride(0), N_HEADS=n_heads, N_KV=cache_k.shape[1],
        HALF=cache_k.shape[3] // 2, KV_BLOCK=cache_k.shape[2])
    return q


# Outside compiled code (a prompt pass, or a step being captured) the kernels are launched directly: the ops'
# dispatch costs more than the kernels.

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x [..., K], times weight [K] (as model.transformer.RMSNorm)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.llama_dist.rms_norm_rows(flat, weight, eps).view(x.shape)
    return _launch_rms_norm(_KERNELS["rms_norm"], flat, weight, eps).view(x.shape)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of each row of x [..., 2H] = [gate, up] -> [..., H]."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.llama_dist.silu_mul_rows(flat).view(*x.shape[:-1], -1)
    return _launch_silu_mul(_KERNELS["silu_mul"], flat).view(*x.shape[:-1], -1)


def rope_and_cache(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                   block_table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv [B, S, (n_heads + 2 kv heads) * head_dim] before the rotary embedding, rope [B, S, head_dim / 2, 2],
    rows and pos [B, S] each token's cache row and position: writes the rotated keys and the values to the
    caches [blocks, kv heads, block, head_dim] (contiguous; paged by block_table [cache rows, blocks per row])
    and returns the rotated queries [B, S, n_heads, head_dim]. A head_dim that is a power of two."""
    bsz, seqlen, _ = qkv.shape
    args = (qkv.reshape(bsz * seqlen, -1).contiguous(), rope.reshape(bsz * seqlen, -1).float().contiguous(),
            cache_k, cache_v, block_table, rows.reshape(-1).contiguous(), pos.reshape(-1).contiguous(), n_heads)
    if torch.compiler.is_compiling():
        q = torch.ops.llama_dist.rope_cache_rows(*args)
    else:
        q = _launch_rope_cache(_KERNELS["rope_cache"], *args)
    return q.view(bsz, seqlen, n_heads, cache_k.shape[3])
