"""One decoded token's attention on CUDA, in Triton: rotary embedding, cache write and attention in one kernel
(on CPUs `decode_attention` runs the same in C++: csrc/decode_attention.cpp).

A decode step's attention reads a few megabytes of cache per layer, a small job for which SDPA's
kernels and the three small ones that rotate q and k and write the cache each pay a launch
(benchmarks/RESULTS.md, "Fused decode kernels"). Here each (row, kv head) is one
program: it rotates the new key and its n_rep query heads (Meta's interleaved pairs), writes the
new key and value to the row's place in the paged cache, then attends to the new position from registers
and streams the cached positions [0, pos) in tiles (each position found through the block table) with an
online softmax (GQA without copying the cache; the window's masked tail is never read). The first tile is
read before the wait for the q/k/v product, so at short contexts its read overlaps that kernel's end.
Prefill and other shapes keep the step-by-step path.
"""
from __future__ import annotations

import functools

import torch

from .gemv import INTERPRETED, bf16_tensor_cores, on_cpp_kernels


@functools.cache
def load() -> bool:
    """Define the kernel and its op (Triton is imported only for CUDA models); False without Triton or on
    GPUs older than Ampere (its bf16 tensor-core products need sm_80; SDPA serves there)."""
    global _await_inputs, _release_dependents, cached_tile  # (the kernel's helpers: looked up there)
    if not bf16_tensor_cores():
        return False
    try:
        import triton
        import triton.language as tl

        from .gemv_triton import _await_inputs, _release_dependents, pdl_launch
        from .paged_triton import cached_tile
        from .tuning import autotune
    except ImportError:
        return False

    @triton.jit
    def _attention_kernel(qkv_ptr, rope_ptr, cache_k_ptr, cache_v_ptr, table_ptr, slot_ptr, pos_ptr, o_ptr,
                          stride_cb, stride_ch, stride_cl, stride_t, scale, N_REP: tl.constexpr,
                          HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_L: tl.constexpr):
        """qkv [B, (n_kv * N_REP + 2 n_kv) * HEAD_DIM]: the new token's q, k, v heads; rope [B, HEAD_DIM / 2, 2]
        (cos, sin); caches [blocks, n_kv, KV_BLOCK, HEAD_DIM] paged by table [rows, blocks per row]; cache row
        slot[b] gets position pos[b]; o [B, n_kv * N_REP * HEAD_DIM]."""
        b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        n_kv = tl.num_programs(1)
        # before the wait, what the q/k/v product does not write: the step's positions and block table (set
        # before its first kernel) and the first tile of earlier positions (written by earlier steps)
        last, slot = tl.load(pos_ptr + b), tl.load(slot_ptr + b)
        blocks = table_ptr + slot * stride_t  # this row's blocks
        keys, values = cached_tile(cache_k_ptr, cache_v_ptr, blocks, 0, last, h, stride_cb, stride_ch, stride_cl,
                                   HEAD_DIM, KV_BLOCK, BLOCK_L)
        _await_inputs()  # (a programmatic dependent of the q/k/v product)
        reps, dims, pairs = tl.arange(0, BLOCK_R), tl.arange(0, HEAD_DIM), tl.arange(0, HEAD_DIM // 2)
        row = qkv_ptr + b * (n_kv * (N_REP + 2) * HEAD_DIM)
        cos = tl.load(rope_ptr + b * HEAD_DIM + 2 * pairs)
        sin = tl.load(rope_ptr + b * HEAD_DIM + 2 * pairs + 1)

        q_at = (h * N_REP + reps)[:, None] * HEAD_DIM + dims[None, :]
        q = tl.load(row + q_at, mask=(reps < N_REP)[:, None], other=0.0).to(tl.float32)
        q0, q1 = tl.split(tl.reshape(q, (BLOCK_R, HEAD_DIM // 2, 2)))
        q = tl.reshape(tl.join(q0 * cos - q1 * sin, q0 * sin + q1 * cos), (BLOCK_R, HEAD_DIM))
        q = q.to(qkv_ptr.dtype.element_ty)
        k = tl.load(row + (n_kv * N_REP + h) * HEAD_DIM + dims).to(tl.float32)
        k0, k1 = tl.split(tl.reshape(k, (HEAD_DIM // 2, 2)))
        k = tl.reshape(tl.join(k0 * cos - k1 * sin, k0 * sin + k1 * cos), (HEAD_DIM,)).to(cache_k_ptr.dtype.element_ty)
        v = tl.load(row + (n_kv * (N_REP + 1) + h) * HEAD_DIM + dims).to(cache_v_ptr.dtype.element_ty)
        new = tl.load(blocks + last // KV_BLOCK) * stride_cb + h * stride_ch + (last % KV_BLOCK) * stride_cl
        tl.store(cache_k_ptr + new + dims, k)
        tl.store(cache_v_ptr + new + dims, v)

        # the new position from registers, then the cached ones, each tile read while the one before is used
        top = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale
        total = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
        acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32) + v.to(tl.float32)[None, :]
        for start in range(0, last, BLOCK_L):
            next_keys, next_values = cached_tile(cache_k_ptr, cache_v_ptr, blocks, start + BLOCK_L, last, h,
                                                 stride_cb, stride_ch, stride_cl, HEAD_DIM, KV_BLOCK, BLOCK_L)
            seen = start + tl.arange(0, BLOCK_L) < last
            scores = (tl.dot(q, tl.trans(keys)) * scale).to(tl.float32)  # inductor passes scale as fp64
            scores = tl.where(seen[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_top[:, None])
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(weights, axis=1)
            acc = acc * shrink[:, None] + tl.dot(weights.to(values.dtype), values)
            top = new_top
            keys, values = next_keys, next_values
        _release_dependents()
        out = acc / total[:, None]
        o_at = b * (n_kv * N_REP * HEAD_DIM) + q_at
        tl.store(o_ptr + o_at, out.to(o_ptr.dtype.element_ty), mask=(reps < N_REP)[:, None])

    configs = [triton.Config({"BLOCK_L": bl}, num_warps=4, num_stages=s) for bl in (32, 64, 128) for s in (2, 3)]
    if INTERPRETED:
        kernel, fixed = _attention_kernel, {"BLOCK_L": 16}
    else:
        kernel, fixed = autotune(configs, ["N_REP", "HEAD_DIM"], "decode_attention")(_attention_kernel), {}

    @torch.library.triton_op("llama_dist::decode_attention", mutates_args={"cache_k", "cache_v"})
    def decode_attention_op(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                            block_table: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                            n_rep: int) -> torch.Tensor:
        """Arguments as decode_attention's."""
        bsz, n_kv, head_dim = qkv.shape[0], cache_k.shape[1], cache_k.shape[3]
        out = torch.empty((bsz, n_kv * n_rep * head_dim), dtype=qkv.dtype, device=qkv.device)
        torch.library.wrap_triton(kernel)[(bsz, n_kv)](
            qkv, rope, cache_k, cache_v, block_table, slots, pos, out, cache_k.stride(0), cache_k.stride(1),
            cache_k.stride(2), block_table.stride(0), head_dim ** -0.5, N_REP=n_rep, HEAD_DIM=head_dim,
            KV_BLOCK=cache_k.shape[2], BLOCK_R=max(16, triton.next_power_of_2(n_rep)), **fixed, **pdl_launch())
        return out

    return True


def supports(head_dim: int, device_type: str = "cuda") -> bool:
    """The Triton kernel's tiles need a head_dim that is a power of two, at least 16; the C++ one a multiple of 8."""
    if device_type == "cpu":
        return head_dim % 8 == 0
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def decode_attention(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     block_table: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Attention of one new token per row. qkv [B, 1, (q heads + 2 kv heads) * head_dim]: its q, k, v before
    the rotary embedding; rope [B, 1, head_dim / 2, 2]; caches [blocks, kv heads, block, head_dim] paged by
    block_table [cache rows, blocks per row] (model.transformer.Attention's); slots [B]: each row's cache row;
    pos [B]: its position (the row sees [0, pos]). Writes the new keys and values to the caches; returns
    [B, 1, q heads * head_dim]."""
    bsz = qkv.shape[0]
    ops = torch.ops.llama_dist
    op = ops.cpu_decode_attention if on_cpp_kernels(qkv.device) else ops.decode_attention
    out = op(qkv.reshape(bsz, -1).contiguous(), rope.reshape(bsz, -1).contiguous(), cache_k, cache_v, block_table,
             slots.contiguous(), pos.contiguous(), n_rep)
    return out.view(bsz, 1, -1)
