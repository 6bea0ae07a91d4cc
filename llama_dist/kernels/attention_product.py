"""A one-row decode step's attention computed inside its output projection's kernel (experiment, off unless
ENABLED): multi-head attention (one query head per kv head) over a short window, on CUDA.

Each program takes a block of wo's rows and one head: before its wait for the q/k/v product it loads its slice of
wo (the rows' inputs of that head) and the head's cached positions (one tile), then rotates q and k, attends,
and multiplies its slice by the head's output; the heads' parts of each row are summed in a fixed order by the last
program to finish the row block (as the one-row kernel's split inputs are), which adds the residual. The step
loses the attention kernel and the wait between it and wo, and wo's weights stream while the q/k/v product ends;
each head's attention is computed once per row block (the cache read that many times, so short windows only).
"""
from __future__ import annotations

import functools

import torch

from .gemv import INTERPRETED

ENABLED = False  # benchmarks/step_ab.py sets it for an arm
SLICE_BYTES = 1 << 15  # wo's bytes a program holds (a 7B int4 wo: 512 rows, 8 row blocks each reading the cache)
WINDOW = 32 if INTERPRETED else 64  # the longest window it serves: one tile of the cache (decode_attention.WHOLE_L)


@functools.cache
def load() -> bool:
    """Define the kernel and its op (after the decode attention's and the one-row kernel's, whose pieces it
    takes); False where those are missing."""
    global _await_inputs, _release_dependents, cached_tile, _new_token, _weights, _int4_groups_product
    global _int8_groups_product, _exact_float, _attention_product_kernel
    from . import decode_attention, gemv

    if not (decode_attention.load() and gemv.load()):
        return False
    import triton
    import triton.language as tl

    from .decode_attention import _new_token
    from .gemv_triton import (_await_inputs, _exact_float, _format, _int4_groups_product, _int8_groups_product,
                              _release_dependents, _shape, _weights, pdl_launch, split_sums)
    from .paged_triton import cached_tile

    @triton.jit
    def _attention_product_kernel(qkv_ptr, rope_ptr, cache_k_ptr, cache_v_ptr, table_ptr, slot_ptr, pos_ptr,
                                  w_ptr, s_ptr, r_ptr, y_ptr, sums_ptr, tickets_ptr, N, K, stride_cb, stride_ch,
                                  stride_cl, stride_t, scale, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
                                  BLOCK_L: tl.constexpr, SCALED: tl.constexpr, INT4: tl.constexpr,
                                  DP4A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        """y [N] = r + wo [N, K] times the attention output of the new token (qkv [(n_kv + 2 n_kv) * HEAD_DIM],
        rope [HEAD_DIM / 2, 2], cache row slot[0] at position pos[0], caches and table as decode_attention's).
        Program (i, h): rows block i, head h (of n_kv <= BLOCK_H); W formats as the one-row kernel's
        (gemv_triton._gemv_kernel)."""
        block, h = tl.program_id(0), tl.program_id(1).to(tl.int64)
        n_kv = tl.num_programs(1)
        rows = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        k0 = h * HEAD_DIM
        # before the wait: what the q/k/v product does not write (wo's slice, the cache of earlier positions)
        w = _weights(w_ptr, rows, row_ok, k0, K, INT4, DP4A, HEAD_DIM)
        last, slot = tl.load(pos_ptr), tl.load(slot_ptr)
        blocks = table_ptr + slot * stride_t
        keys, values = cached_tile(cache_k_ptr, cache_v_ptr, blocks, 0, last, h, stride_cb, stride_ch, stride_cl,
                                   HEAD_DIM, KV_BLOCK, BLOCK_L)
        _await_inputs()
        _release_dependents()
        q, k, v, _ = _new_token(qkv_ptr, rope_ptr, 0, h, n_kv, 1, HEAD_DIM, 1)
        q = tl.reshape(q, (HEAD_DIM,)).to(tl.float32)
        dims = tl.arange(0, HEAD_DIM)
        k, v = k.to(cache_k_ptr.dtype.element_ty), v.to(cache_v_ptr.dtype.element_ty)
        if block == 0:
            new = tl.load(blocks + last // KV_BLOCK) * stride_cb + h * stride_ch + (last % KV_BLOCK) * stride_cl
            tl.store(cache_k_ptr + new + dims, k)
            tl.store(cache_v_ptr + new + dims, v)
        # the online softmax: the new position from registers, then the cache tile by tile (one, unless a window
        # too short for the row was given)
        top = tl.sum(q * k.to(tl.float32), axis=0) * scale
        total = 1.0
        acc = v.to(tl.float32)
        for first in range(0, last, BLOCK_L):
            if first > 0:
                keys, values = cached_tile(cache_k_ptr, cache_v_ptr, blocks, first, last, h, stride_cb, stride_ch,
                                           stride_cl, HEAD_DIM, KV_BLOCK, BLOCK_L)
            scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1) * scale
            scores = tl.where(first + tl.arange(0, BLOCK_L) < last, scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_top)
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(weights, axis=0)
            acc = acc * shrink + tl.sum(weights[:, None] * values.to(tl.float32), axis=0)
            top = new_top
        x = (acc / total).to(qkv_ptr.dtype.element_ty).to(tl.float32)  # (as the attention kernel's output holds it)
        # this head's part of each row
        if INT4:
            y = tl.sum(_int4_groups_product(w, x, s_ptr, rows, row_ok, k0, N, K, HEAD_DIM), axis=1)
        elif DP4A:
            y = tl.sum(_int8_groups_product(w, x, HEAD_DIM), axis=1)
        else:
            y = tl.sum((_exact_float(w.to(tl.int32)) if SCALED else w.to(tl.float32)) * x[None, :], axis=1)
        part = sums_ptr + h * N
        tl.store(part + rows, y, mask=row_ok)
        tl.debug_barrier()  # every thread's part before the ticket
        if tl.atomic_add(tickets_ptr + block, 1, sem="acq_rel", scope="gpu") == n_kv - 1:
            tl.atomic_xchg(tickets_ptr + block, 0, sem="relaxed")  # for the next launch
            heads = tl.arange(0, BLOCK_H)  # (every head's part asked for at once, read from L2; summed as a tree of
            # fixed shape: the same sum every run)
            parts = tl.load(sums_ptr + heads[:, None] * N + rows[None, :],
                            mask=(heads < n_kv)[:, None] & row_ok[None, :], other=0.0, cache_modifier=".cg")
            y = tl.sum(parts, axis=0)
            if SCALED:
                y = y * tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            y += tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @torch.library.triton_op("llama_dist::attention_product", mutates_args={"cache_k", "cache_v"})
    def attention_product_op(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                             block_table: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, w: torch.Tensor,
                             scales: torch.Tensor, residual: torch.Tensor, scaled: bool) -> torch.Tensor:
        """Arguments as attention_product's."""
        n, k = _shape(w)
        n_kv, head_dim = cache_k.shape[1], cache_k.shape[3]
        y = torch.empty((1, n), dtype=qkv.dtype, device=qkv.device)
        bits = 4 if w.dtype == torch.int32 else 8 * w.element_size()
        block_n = 32 if INTERPRETED else SLICE_BYTES * 8 // (head_dim * bits)
        row_blocks = triton.cdiv(n, block_n)
        sums, tickets = split_sums(qkv, n_kv * n, row_blocks)
        torch.library.wrap_triton(_attention_product_kernel)[(row_blocks, n_kv)](
            qkv, rope, cache_k, cache_v, block_table, slots, pos, w, scales, residual, y, sums, tickets, n, k,
            cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), block_table.stride(0), head_dim ** -0.5,
            HEAD_DIM=head_dim, KV_BLOCK=cache_k.shape[2], BLOCK_L=max(WINDOW, 16), **_format(w, scaled),
            BLOCK_N=block_n, BLOCK_H=triton.next_power_of_2(n_kv), num_warps=4, **pdl_launch())
        return y

    return True


def serves(bsz: int, n_rep: int, head_dim: int, w: torch.Tensor, window: int, device: torch.device) -> bool:
    """Whether a step takes this kernel: one row, one query head per kv head, a window of at most WINDOW
    positions, heads of whole groups of 32 inputs where wo is quantized, on CUDA (or the interpreter), while
    ENABLED."""
    return (ENABLED and bsz == 1 and n_rep == 1 and window <= WINDOW and (device.type == "cuda" or INTERPRETED)
            and (head_dim % 32 == 0 or w.is_floating_point()) and load())


def attention_product(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      block_table: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, w: torch.Tensor,
                      scales: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """residual + wo's product with the new token's attention, one row: qkv [1, 1, 3 n_kv head_dim], rope [1, 1,
    head_dim / 2, 2], caches, table, slots [1] and pos [1] as decode_attention's (the new key and value written
    to the cache); w, scales as the one-row kernel's; residual [1, 1, dim]. Returns [1, 1, dim]."""
    flat = residual.reshape(1, -1)
    y = torch.ops.llama_dist.attention_product(
        qkv.reshape(1, -1).contiguous(), rope.reshape(1, -1).contiguous(), cache_k, cache_v, block_table,
        slots.contiguous(), pos.contiguous(), w, flat if scales is None else scales, flat, scales is not None)
    return y.view(1, 1, -1)
