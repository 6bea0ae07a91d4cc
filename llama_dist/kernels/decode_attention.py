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
When the rows are too few to fill the GPU, a row's positions fall in parts and several programs take its parts
at once (as flash-decoding splits the cache); the parts' softmax states merge in a fixed order. Each row shares its
own positions out evenly, in whole tiles, over the programs it has, so a short row is read in one tile per
program, loaded before the wait for the q/k/v product; rows within one larger tile (launch()) are read whole by one
program, with nothing to merge. Otherwise one program reads the whole row. Batch-invariant runs always read in
parts of PART_L, so a row's result is the same whatever the batch.
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
    # (the kernel and its helpers, module globals: the interpreter finds the helpers there, tests the kernel)
    global _await_inputs, _release_dependents, cached_tile, _new_token, _attend, _take_tile, _store, _merge
    global _attention_kernel
    if not bf16_tensor_cores():
        return False
    try:
        import triton
        import triton.language as tl

        from .gemv_triton import _await_inputs, _release_dependents, pdl_launch, split_sums
        from .paged_triton import cached_tile
    except ImportError:
        return False

    @triton.jit
    def _new_token(qkv_ptr, rope_ptr, b, h, n_kv, N_REP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_R: tl.constexpr):
        """Row b's new query heads of kv head h (BLOCK_R rows, past N_REP zero) and key, rotated (Meta's
        interleaved pairs), its value, and where the query heads sit in a row of q or of the output."""
        reps, dims, pairs = tl.arange(0, BLOCK_R), tl.arange(0, HEAD_DIM), tl.arange(0, HEAD_DIM // 2)
        row = qkv_ptr + b * (n_kv * (N_REP + 2) * HEAD_DIM)
        cos = tl.load(rope_ptr + b * HEAD_DIM + 2 * pairs)
        sin = tl.load(rope_ptr + b * HEAD_DIM + 2 * pairs + 1)
        q_at = (h * N_REP + reps)[:, None] * HEAD_DIM + dims[None, :]
        q = tl.load(row + q_at, mask=(reps < N_REP)[:, None], other=0.0).to(tl.float32)
        q0, q1 = tl.split(tl.reshape(q, (BLOCK_R, HEAD_DIM // 2, 2)))
        q = tl.reshape(tl.join(q0 * cos - q1 * sin, q0 * sin + q1 * cos), (BLOCK_R, HEAD_DIM))
        k = tl.load(row + (n_kv * N_REP + h) * HEAD_DIM + dims).to(tl.float32)
        k0, k1 = tl.split(tl.reshape(k, (HEAD_DIM // 2, 2)))
        k = tl.reshape(tl.join(k0 * cos - k1 * sin, k0 * sin + k1 * cos), (HEAD_DIM,))
        v = tl.load(row + (n_kv * (N_REP + 1) + h) * HEAD_DIM + dims)
        return q.to(qkv_ptr.dtype.element_ty), k, v, q_at

    @triton.jit
    def _attend(q, keys, values, top, total, acc, cache_k_ptr, cache_v_ptr, blocks, start, end, next_start,
                next_end, h, stride_cb, stride_ch, stride_cl, scale, HEAD_DIM: tl.constexpr,
                KV_BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, SPLIT: tl.constexpr):
        """The online softmax (top, total, acc) of q taken on over cached positions [start, end), whose first tile
        is (keys, values): each tile read while the one before is used, and after the last, the first of
        [next_start, next_end), returned with the softmax."""
        for first in range(start, end, BLOCK_L):
            if SPLIT:
                more = first + BLOCK_L < end
                next_first, next_last = tl.where(more, first + BLOCK_L, next_start), tl.where(more, end, next_end)
            else:
                next_first, next_last = first + BLOCK_L, end
            next_keys, next_values = cached_tile(cache_k_ptr, cache_v_ptr, blocks, next_first, next_last, h,
                                                 stride_cb, stride_ch, stride_cl, HEAD_DIM, KV_BLOCK, BLOCK_L)
            top, total, acc = _take_tile(q, keys, values, top, total, acc, first, end, scale, BLOCK_L)
            keys, values = next_keys, next_values
        return top, total, acc, keys, values

    @triton.jit
    def _take_tile(q, keys, values, top, total, acc, first, end, scale, BLOCK_L: tl.constexpr):
        """The online softmax (top, total, acc) of q taken on over the tile of positions [first, first + BLOCK_L)
        before `end`."""
        seen = first + tl.arange(0, BLOCK_L) < end
        scores = (tl.dot(q, tl.trans(keys)) * scale).to(tl.float32)  # (inductor passes scale as fp64)
        scores = tl.where(seen[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_top[:, None])
        shrink = tl.exp(top - new_top)
        total = total * shrink + tl.sum(weights, axis=1)
        acc = acc * shrink[:, None] + tl.dot(weights.to(values.dtype), values)
        return new_top, total, acc

    @triton.jit
    def _store(o_at, acc, total, asked):
        """A softmax's result, the weighted values over their weights' total, to the output's query heads."""
        tl.store(o_at, (acc / total[:, None]).to(o_at.dtype.element_ty), mask=asked[:, None])

    @triton.jit
    def _merge(states, n_parts, o_row, N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, MERGE_R: tl.constexpr,
               MERGE_P: tl.constexpr):
        """A row's parts' softmax states (states [n_parts, N_REP, HEAD_DIM + 2]: acc, top, total) merged in order
        into its result, to o_row's N_REP query heads. MERGE_P parts' states are read at once, from L2 where the
        other programs' states land (a loop over the parts would wait for each read in turn)."""
        parts, reps, dims = tl.arange(0, MERGE_P), tl.arange(0, MERGE_R), tl.arange(0, HEAD_DIM)
        asked = reps < N_REP  # (rows past N_REP pad the tile to a power of two)
        top = tl.full((MERGE_R,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((MERGE_R,), dtype=tl.float32)
        acc = tl.zeros((MERGE_R, HEAD_DIM), dtype=tl.float32)
        for first in range(0, n_parts, MERGE_P):
            held = ((first + parts) < n_parts)[:, None] & asked[None, :]
            at = states + (first + parts)[:, None] * (N_REP * (HEAD_DIM + 2)) + reps[None, :] * (HEAD_DIM + 2)
            tops = tl.load(at + HEAD_DIM, mask=held, other=float("-inf"), cache_modifier=".cg")
            tops = tl.where(asked[None, :], tops, 0.0)  # (rows past N_REP: finite, never stored)
            totals = tl.load(at + HEAD_DIM + 1, mask=held, other=1.0, cache_modifier=".cg")
            accs = tl.load(at[:, :, None] + dims[None, None, :], mask=held[:, :, None], other=0.0,
                           cache_modifier=".cg")
            new_top = tl.maximum(top, tl.max(tops, axis=0))
            weights = tl.exp(tops - new_top[None, :])
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(totals * weights, axis=0)
            acc = acc * shrink[:, None] + tl.sum(accs * weights[:, :, None], axis=0)
            top = new_top
        _store(o_row + reps[:, None] * HEAD_DIM + dims[None, :], acc, total, asked)

    @triton.jit
    def _attention_kernel(qkv_ptr, rope_ptr, cache_k_ptr, cache_v_ptr, table_ptr, slot_ptr, pos_ptr, o_ptr,
                          parts_ptr, tickets_ptr, max_parts, stride_cb, stride_ch, stride_cl, stride_t, scale,
                          N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, PART_L: tl.constexpr, SPLIT: tl.constexpr,
                          EVEN: tl.constexpr, WHOLE: tl.constexpr, MERGE_R: tl.constexpr, MERGE_P: tl.constexpr):
        """qkv [B, (n_kv * N_REP + 2 n_kv) * HEAD_DIM]: the new token's q, k, v heads; rope [B, HEAD_DIM / 2, 2]
        (cos, sin); caches [blocks, n_kv, KV_BLOCK, HEAD_DIM] paged by table [rows, blocks per row]; cache row
        slot[b] gets position pos[b]; o [B, n_kv * N_REP * HEAD_DIM]. Not SPLIT: program (b, h) reads all of
        [0, pos]. SPLIT: positions [0, pos] fall in parts and program (b, h, p) takes parts p, p + P, ... of P;
        a row of several parts leaves each part's softmax state in parts [B, n_kv, max_parts, N_REP,
        HEAD_DIM + 2] and its last program to finish (tickets [B * n_kv]) merges them in order (_merge). EVEN: a row's
        parts are at most P, of whole tiles; else of PART_L (so a row's result does not depend on P). WHOLE (not
        SPLIT): the window fits one tile, so no next tile is read ahead."""
        b, h, p = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
        n_kv, programs = tl.num_programs(1), tl.num_programs(2)
        # before the wait, what the q/k/v product does not write: the step's positions and block table (set
        # before its first kernel) and the first tile of earlier positions (written by earlier steps)
        last, slot = tl.load(pos_ptr + b), tl.load(slot_ptr + b)
        blocks = table_ptr + slot * stride_t  # this row's blocks
        if EVEN:  # [0, last] over at most `programs` parts
            part_l = tl.cdiv(tl.cdiv(last + 1, programs), BLOCK_L) * BLOCK_L
        else:
            part_l = PART_L
        if SPLIT:
            n_parts = (last // part_l + 1).to(tl.int32)
            first_end = tl.minimum(p * part_l + part_l, last)
        else:
            n_parts = 1
            first_end = last
        keys, values = cached_tile(cache_k_ptr, cache_v_ptr, blocks, p * part_l, first_end, h, stride_cb, stride_ch,
                                   stride_cl, HEAD_DIM, KV_BLOCK, BLOCK_L)
        if p < n_parts:  # (the row's positions may need fewer parts than the launch has programs)
            _await_inputs()  # (a programmatic dependent of the q/k/v product)
            _release_dependents()
            q, k, v, q_at = _new_token(qkv_ptr, rope_ptr, b, h, n_kv, N_REP, HEAD_DIM, BLOCK_R)
            dims = tl.arange(0, HEAD_DIM)
            if p == (n_parts - 1) % programs:  # the program whose parts include the new position's
                new = tl.load(blocks + last // KV_BLOCK) * stride_cb + h * stride_ch + (last % KV_BLOCK) * stride_cl
                tl.store(cache_k_ptr + new + dims, k.to(cache_k_ptr.dtype.element_ty))
                tl.store(cache_v_ptr + new + dims, v.to(cache_v_ptr.dtype.element_ty))
            # the new position's softmax, from registers (k and v as the cache holds them)
            new_top = tl.sum(q.to(tl.float32) * k.to(cache_k_ptr.dtype.element_ty).to(tl.float32)[None, :], axis=1)
            new_top = (new_top * scale).to(tl.float32)  # (fp32 whatever type scale comes in)
            new_acc = v.to(cache_v_ptr.dtype.element_ty).to(tl.float32)[None, :]
            asked = (tl.arange(0, BLOCK_R) < N_REP)  # (rows past N_REP pad the tile for tl.dot)
            o_at = o_ptr + b * (n_kv * N_REP * HEAD_DIM) + q_at
            if not SPLIT:
                top, total = new_top, tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
                acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32) + new_acc
                if WHOLE:  # (no next tile to hold beside this one)
                    top, total, acc = _take_tile(q, keys, values, top, total, acc, 0, last, scale, BLOCK_L)
                    for first in range(BLOCK_L, last, BLOCK_L):  # (only past a window too short for the row)
                        keys, values = cached_tile(cache_k_ptr, cache_v_ptr, blocks, first, last, h, stride_cb,
                                                   stride_ch, stride_cl, HEAD_DIM, KV_BLOCK, BLOCK_L)
                        top, total, acc = _take_tile(q, keys, values, top, total, acc, first, last, scale, BLOCK_L)
                else:
                    top, total, acc, keys, values = _attend(q, keys, values, top, total, acc, cache_k_ptr,
                                                            cache_v_ptr, blocks, 0, last, last, last, h, stride_cb,
                                                            stride_ch, stride_cl, scale, HEAD_DIM, KV_BLOCK, BLOCK_L,
                                                            SPLIT)
                _store(o_at, acc, total, asked)
            else:
                states = parts_ptr + (b * n_kv + h) * max_parts * (N_REP * (HEAD_DIM + 2))  # this row's and head's
                for part in range(p, n_parts, programs):
                    start, later = part * part_l, (part + programs) * part_l  # (later: this program's next part)
                    with_new = part == n_parts - 1  # (the new position is in the last part)
                    top = tl.where(with_new, new_top, float("-inf"))
                    total = tl.where(with_new, 1.0, 0.0) + tl.zeros((BLOCK_R,), dtype=tl.float32)
                    acc = tl.where(with_new, new_acc, 0.0) + tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
                    top, total, acc, keys, values = _attend(q, keys, values, top, total, acc, cache_k_ptr,
                                                            cache_v_ptr, blocks, start,
                                                            tl.minimum(start + part_l, last), later,
                                                            tl.minimum(later + part_l, last), h, stride_cb,
                                                            stride_ch, stride_cl, scale, HEAD_DIM, KV_BLOCK, BLOCK_L,
                                                            SPLIT)
                    if n_parts == 1:
                        _store(o_at, acc, total, asked)
                    else:
                        state = states + part * (N_REP * (HEAD_DIM + 2)) + tl.arange(0, BLOCK_R) * (HEAD_DIM + 2)
                        tl.store(state[:, None] + dims[None, :], acc, mask=asked[:, None])
                        tl.store(state + HEAD_DIM, top, mask=asked)
                        tl.store(state + HEAD_DIM + 1, total, mask=asked)
                if n_parts > 1:
                    mine = (n_parts - 1 - p) // programs + 1  # parts this program merged in
                    tl.debug_barrier()  # every thread's state before the ticket
                    ticket = tl.atomic_add(tickets_ptr + b * n_kv + h, mine, sem="acq_rel", scope="gpu")
                    if ticket + mine == n_parts:
                        tl.atomic_xchg(tickets_ptr + b * n_kv + h, 0, sem="relaxed")  # for the next launch
                        _merge(states, n_parts, o_ptr + b * (n_kv * N_REP * HEAD_DIM) + h * N_REP * HEAD_DIM, N_REP,
                               HEAD_DIM, MERGE_R, MERGE_P)

    @torch.library.triton_op("llama_dist::decode_attention", mutates_args={"cache_k", "cache_v"})
    def decode_attention_op(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                            block_table: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                            n_rep: int, invariant: bool, window: int) -> torch.Tensor:
        """Arguments as decode_attention's."""
        bsz, n_kv, head_dim = qkv.shape[0], cache_k.shape[1], cache_k.shape[3]
        out = torch.empty((bsz, n_kv * n_rep * head_dim), dtype=qkv.dtype, device=qkv.device)
        capacity = block_table.shape[1] * cache_k.shape[2]
        window = min(window, capacity)
        programs, tile_l, warps = launch(window, bsz * n_kv, invariant, _resident_programs(qkv.device))
        split = programs > 1 or invariant  # (otherwise parts would not run at once: one program reads a row)
        # invariant: parts of PART_L over the whole cache; else at most one part a program
        max_parts = triton.cdiv(capacity, PART_L) if invariant else programs
        states, tickets = split_sums(qkv, bsz * n_kv * max_parts * n_rep * (head_dim + 2) if split else 0, bsz * n_kv)
        merge_r = triton.next_power_of_2(n_rep)
        merge_p = max(1, min(triton.next_power_of_2(max_parts), MERGE_STATES // merge_r))
        torch.library.wrap_triton(_attention_kernel)[(bsz, n_kv, programs)](
            qkv, rope, cache_k, cache_v, block_table, slots, pos, out, states, tickets, max_parts,
            cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), block_table.stride(0), head_dim ** -0.5,
            N_REP=n_rep, HEAD_DIM=head_dim, KV_BLOCK=cache_k.shape[2], BLOCK_R=max(16, triton.next_power_of_2(n_rep)),
            BLOCK_L=tile_l, PART_L=PART_L, SPLIT=split, EVEN=not invariant, WHOLE=not split and window <= tile_l,
            MERGE_R=merge_r, MERGE_P=merge_p, num_warps=warps, **pdl_launch())
        return out

    return True


# One tile, not autotuned: the tuner timed the first call's context, and a tile that wins there loses elsewhere
# (64 positions: faster at 4k, slower at 16; 128 spills registers and was picked once). 4 warps, Triton's default.
BLOCK_L = 16 if INTERPRETED else 32
# With few rows a long context is read by several programs at once: a row's positions fall in parts, each part's
# softmax taken by one program and the parts merged. Batch-invariant runs: parts of PART_L; others: a row's
# positions shared evenly over the programs, in whole tiles of BLOCK_L (parts of 32 against 64 and 512:
# benchmarks/RESULTS.md). The interpreter's are small, to test them.
PART_L = 32 if INTERPRETED else 512
# Rows within WHOLE_L positions, where they are too few to fill the GPU: one program a row and kv head reads them
# as one tile of WHOLE_L, every position loaded before the wait (no parts to merge), with WHOLE_WARPS warps (64 and
# 8 against 32 / 4, 128 / 8 and 128 / 16: benchmarks/RESULTS.md). With more rows, whose programs fill the GPU
# anyway, fewer of those programs fit an SM at once than of 4 warps (batch 32: -6%).
WHOLE_L, WHOLE_WARPS = (32, 4) if INTERPRETED else (64, 8)
# A row's parts merge MERGE_STATES // n_rep at a time, read at once (32 states of head_dim 128 in fp32: 32 registers
# a thread of 4 warps; against one part at a time: benchmarks/RESULTS.md). The interpreter's few, so that a merge
# takes several reads.
MERGE_STATES = 4 if INTERPRETED else 32


def launch(window: int, rows: int, invariant: bool, resident: int) -> tuple[int, int, int]:
    """(programs per row and kv head, tile length, warps) of a launch for `rows` rows x kv heads whose positions
    lie within `window`, on a GPU that runs `resident` programs of 4 warps at once."""
    if invariant:
        return max(1, min(-(-window // PART_L), resident // rows)), BLOCK_L, 4
    if window <= WHOLE_L and resident // rows > 1:
        return 1, WHOLE_L, WHOLE_WARPS
    return max(1, min(-(-window // BLOCK_L), resident // rows)), BLOCK_L, 4


# Programs of 4 warps an SM runs at once, as launch() counts them: up to 255 registers a thread fill half an SM's
# (the kernel takes 168 for sm_90, so three fit, but lost, as did four in two waves: benchmarks/RESULTS.md)
PROGRAMS_PER_SM = 2


def _resident_programs(device: torch.device) -> int:
    """Programs of the kernel the GPU runs at once (the interpreter: 8)."""
    return 8 if INTERPRETED else PROGRAMS_PER_SM * _sm_count(device)


@functools.cache  # (asked at every launch)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(head_dim: int, device_type: str = "cuda") -> bool:
    """The Triton kernel's tiles need a head_dim that is a power of two, at least 16; the C++ one a multiple of 8."""
    if device_type == "cpu":
        return head_dim % 8 == 0
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def windows(n_ctx: int) -> list[int]:
    """The cache windows past which the CUDA kernel's launch changes, so that a CUDA graph per window replays the
    right one: rows within WHOLE_L positions read whole, longer ones in parts over several programs."""
    return sorted({min(WHOLE_L, n_ctx), n_ctx})


def decode_attention(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     block_table: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, n_rep: int,
                     invariant: bool = False, window: int | None = None) -> torch.Tensor:
    """Attention of one new token per row. qkv [B, 1, (q heads + 2 kv heads) * head_dim]: its q, k, v before
    the rotary embedding; rope [B, 1, head_dim / 2, 2]; caches [blocks, kv heads, block, head_dim] paged by
    block_table [cache rows, blocks per row] (model.transformer.Attention's); slots [B]: each row's cache row;
    pos [B]: its position (the row sees [0, pos]). Writes the new keys and values to the caches; returns
    [B, 1, q heads * head_dim]. invariant: a row's result the same whatever the batch (CPUs: always so).
    window: a length every row's positions lie within (default: the cache's); the CUDA kernel launches programs
    for at most as many parts of a row as it holds, so a short window launches none that would find nothing to
    read (one too short costs only speed: a program takes the parts past its window's too)."""
    bsz = qkv.shape[0]
    args = (qkv.reshape(bsz, -1).contiguous(), rope.reshape(bsz, -1).contiguous(), cache_k, cache_v, block_table,
            slots.contiguous(), pos.contiguous(), n_rep)
    if on_cpp_kernels(qkv.device):
        out = torch.ops.llama_dist.cpu_decode_attention(*args)
    else:
        capacity = block_table.shape[1] * cache_k.shape[2]
        out = torch.ops.llama_dist.decode_attention(*args, invariant, capacity if window is None else window)
    return out.view(bsz, 1, -1)
