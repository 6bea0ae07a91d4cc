"""A tile of one row's cached keys and values, read through the paged cache's block table: the Triton function
both attention kernels stream with (decode_attention.py, packed_attention.py; imported by their load(), so
Triton is imported only when a model is given them)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cached_tile(cache_k_ptr, cache_v_ptr, blocks, start, end, kv_head, stride_cb, stride_ch, stride_cl,
                HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_L: tl.constexpr):
    """Keys and values of positions [start, start + BLOCK_L) of the row whose blocks are `blocks`, zeros from
    `end` on; caches [blocks, kv heads, KV_BLOCK, HEAD_DIM]."""
    cols = start + tl.arange(0, BLOCK_L)
    seen = cols < end
    at = (tl.load(blocks + cols // KV_BLOCK, mask=seen, other=0) * stride_cb + kv_head * stride_ch
          + (cols % KV_BLOCK) * stride_cl)[:, None] + tl.arange(0, HEAD_DIM)[None, :]
    return (tl.load(cache_k_ptr + at, mask=seen[:, None], other=0.0),
            tl.load(cache_v_ptr + at, mask=seen[:, None], other=0.0))
