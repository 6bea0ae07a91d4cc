"""Packed prompt chunks' attention on CUDA, in Triton: every sequence of a packed pass over its own cache
row (through the paged cache's block table), in one kernel per layer.

A server step reads several requests' prompt chunks side by side in one row (model.transformer.Packed).
The model's own path attends sequence by sequence (an SDPA call and a few small operations each), which
costs the CPU more than the GPU's work, and cannot be recorded in a CUDA graph, whose replays cannot
follow a Python loop over this step's sequences. Here one launch covers them all, reading the layout from
device tensors (each token's cache row and position, the lengths of runs of tokens in one row), so a graph
captured for a token count replays any packing of that many tokens (runner/graphs.py).

Program (block, head): block b of the pass is at most BLOCK_M tokens of one run (run i holds
ceil(lengths[i] / BLOCK_M) blocks, found from the lengths in the kernel); it streams the row's cached keys
and values [0, the block's last position] in BLOCK_N tiles with an online softmax (flash attention), each
token seeing positions up to its own. A tile wholly past a token's position adds exact zeros to its sums,
so a token's result does not depend on how the pass was cut into blocks: not on the other sequences, nor
on where its own prompt was cut into chunks. The keys and values are in the cache already (written by the
rotary kernel, rows.rope_and_cache).
"""
from __future__ import annotations

import functools

import torch

from .gemv import INTERPRETED, bf16_tensor_cores

BLOCK_M = 16 if INTERPRETED else 64  # tokens of one sequence per program

_KERNELS: dict = {}


@functools.cache
def load() -> bool:
    """Define the kernel (importing Triton takes seconds, which CPU runs should not pay). False without
    Triton or on GPUs older than Ampere (its bf16 tensor-core products need sm_80)."""
    global cached_tile  # (the kernel's helper: looked up there)
    if not bf16_tensor_cores():
        return False
    try:
        import triton
        import triton.language as tl

        from .paged_triton import cached_tile
    except ImportError:
        return False

    @triton.jit
    def _packed_attention_kernel(q_ptr, cache_k_ptr, cache_v_ptr, table_ptr, rows_ptr, pos_ptr, lengths_ptr, o_ptr,
                                 n_runs, stride_cb, stride_ch, stride_cl, stride_t, scale, N_HEADS: tl.constexpr,
                                 N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
                                 RUNS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """q, o [tokens, N_HEADS * HEAD_DIM]; caches [blocks, kv heads, KV_BLOCK, HEAD_DIM] paged by table
        [rows, blocks per row]; rows, pos [tokens]; lengths [n_runs] of the runs (RUNS: a power of two >=
        n_runs). Blocks past the last (the grid is an upper bound) exit."""
        block, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, RUNS)
        lengths = tl.load(lengths_ptr + s, mask=s < n_runs, other=0)
        blocks = (lengths + BLOCK_M - 1) // BLOCK_M
        run = tl.sum((tl.cumsum(blocks, 0) <= block).to(tl.int32), 0)  # the run holding this block
        if run >= n_runs:
            return
        before = s < run
        first_block = tl.sum(tl.where(before, blocks, 0), 0)
        skipped = (block - first_block) * BLOCK_M  # tokens of this run in earlier blocks
        first = tl.sum(tl.where(before, lengths, 0), 0) + skipped
        count = tl.sum(tl.where(s == run, lengths, 0), 0) - skipped

        m, dims = tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM)
        mine = m < count
        tokens = (first + m).to(tl.int64)
        q_pos = tl.load(pos_ptr + tokens, mask=mine, other=0)  # a token past the block sees position 0 only
        last = tl.max(q_pos, 0)
        row = tl.load(rows_ptr + first.to(tl.int64))
        q_at = tokens[:, None] * (N_HEADS * HEAD_DIM) + h * HEAD_DIM + dims[None, :]
        q = tl.load(q_ptr + q_at, mask=mine[:, None], other=0.0)
        blocks = table_ptr + row * stride_t  # this row's blocks

        top = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        for start in range(0, last + 1, BLOCK_N):
            keys, values = cached_tile(cache_k_ptr, cache_v_ptr, blocks, start, last + 1, h // N_REP, stride_cb,
                                       stride_ch, stride_cl, HEAD_DIM, KV_BLOCK, BLOCK_N)
            cols = start + tl.arange(0, BLOCK_N)
            scores = tl.dot(q, tl.trans(keys)) * scale
            scores = tl.where(cols[None, :] <= q_pos[:, None], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_top[:, None])
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(weights, axis=1)
            acc = acc * shrink[:, None] + tl.dot(weights.to(values.dtype), values)
            top = new_top
        tl.store(o_ptr + q_at, (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=mine[:, None])

    _KERNELS["packed_attention"] = _packed_attention_kernel
    return True


def packed_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, block_table: torch.Tensor,
                     rows: torch.Tensor, positions: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """Rotated queries q [tokens, heads, head_dim] of packed runs (runs [runs]: their lengths, consecutive in q;
    a run's tokens share one cache row) over their rows of the caches [blocks, kv heads, block, head_dim] (paged
    by block_table [cache rows, blocks per row]), each token seeing the positions up to its own (rows,
    positions [tokens]).
    Returns [tokens, heads * head_dim]. A head_dim that is a power of two, at least 16 (as the decode kernel's)."""
    n_tokens, n_heads, head_dim = q.shape
    n_runs = runs.shape[0]
    out = torch.empty((n_tokens, n_heads * head_dim), dtype=q.dtype, device=q.device)
    grid = (-(-n_tokens // BLOCK_M) + n_runs, n_heads)  # each run adds at most one partial block
    _KERNELS["packed_attention"][grid](
        q.contiguous(), cache_k, cache_v, block_table, rows, positions, runs, out, n_runs,
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), block_table.stride(0), head_dim ** -0.5,
        N_HEADS=n_heads, N_REP=n_heads // cache_k.shape[1], HEAD_DIM=head_dim, KV_BLOCK=cache_k.shape[2],
        RUNS=max(16, 1 << (n_runs - 1).bit_length()), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_M if INTERPRETED else 64)
    return out
