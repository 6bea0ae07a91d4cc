"""One decoded token's attention over the KV cache on CUDA, in Triton.

A decode step's attention reads a few megabytes of cache per layer; cuDNN's SDPA kernel spends
~8 us per layer on it for a 256-position window on an H100 (5% of a 7B token), mostly set-up for a
problem shaped like prefill. This kernel gives each (row, kv head) one program that streams the
cached positions [0, pos] in blocks with an online softmax, the kv head's n_rep query heads
together (GQA without copying the cache), and skips the masked tail of the window instead of
reading it. Prefill and other shapes keep SDPA.
"""
from __future__ import annotations

import functools

import torch

from ..quant.gpu_gemv import INTERPRETED, kernel_enabled

_ready = False  # set once load() has defined the op


@functools.cache
def load() -> bool:
    """Define the kernel and its op (Triton is imported only for CUDA models); False without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, stride_kb, stride_kh, stride_kl,
                          stride_vb, stride_vh, stride_vl, scale,
                          N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_L: tl.constexpr):
        """q [B, kv heads, N_REP, HEAD_DIM] contiguous; k, v [B, kv heads, L, HEAD_DIM] (last dim contiguous);
        row b attends to positions [0, pos[b]]. o like q."""
        b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        n_kv = tl.num_programs(1)
        last = tl.load(pos_ptr + b)
        reps, dims = tl.arange(0, BLOCK_R), tl.arange(0, HEAD_DIM)
        q_at = ((b * n_kv + h) * N_REP + reps)[:, None] * HEAD_DIM + dims[None, :]
        q = tl.load(q_ptr + q_at, mask=(reps < N_REP)[:, None], other=0.0)
        q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
        top = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
        k_base, v_base = k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh
        for start in range(0, last + 1, BLOCK_L):
            cols = start + tl.arange(0, BLOCK_L)
            seen = cols <= last
            k = tl.load(k_base + cols[:, None] * stride_kl + dims[None, :], mask=seen[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vl + dims[None, :], mask=seen[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k))
            scores = tl.where(seen[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_top[:, None])
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(weights, axis=1)
            acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)
            top = new_top
        out = acc / total[:, None]
        tl.store(o_ptr + q_at, out.to(o_ptr.dtype.element_ty), mask=(reps < N_REP)[:, None])

    configs = [triton.Config({"BLOCK_L": bl}, num_warps=w, num_stages=s)
               for bl in (32, 64, 128) for w in (4,) for s in (2, 3)]
    if INTERPRETED:
        kernel, fixed = _attention_kernel, {"BLOCK_L": 16}
    else:
        kernel, fixed = triton.autotune(configs=configs, key=["N_REP", "HEAD_DIM"])(_attention_kernel), {}

    @torch.library.triton_op("llama_dist::decode_attention", mutates_args={})
    def decode_attention_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            last: torch.Tensor) -> torch.Tensor:
        """q [B, kv heads, n_rep, head_dim]; keys, values [B, kv heads, L, head_dim]; last [B]."""
        bsz, n_kv, n_rep, head_dim = q.shape
        q = q.contiguous()
        out = torch.empty_like(q)
        torch.library.wrap_triton(kernel)[(bsz, n_kv)](
            q, keys, values, last, out, keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), head_dim ** -0.5,
            N_REP=n_rep, HEAD_DIM=head_dim, BLOCK_R=max(16, triton.next_power_of_2(n_rep)), **fixed)
        return out

    global _ready
    _ready = True
    return True


def enabled(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """One query position per row, on CUDA (or the interpreter), head_dim a power of two >= 16, once load()
    has defined the kernel (LLAMA_DIST_ATTENTION=0 turns it off)."""
    d = q.shape[-1]
    return _ready and kernel_enabled(q, "LLAMA_DIST_ATTENTION") and d >= 16 and d & (d - 1) == 0 and keys.stride(-1) == 1


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row: q [B, kv heads, n_rep, head_dim] over keys/values
    [B, kv heads, L, head_dim], row b seeing positions [0, last[b]]. Returns q's shape."""
    return torch.ops.llama_dist.decode_attention(q, keys, values, last)
