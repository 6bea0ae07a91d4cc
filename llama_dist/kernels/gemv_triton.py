"""The Triton kernels and ops behind kernels/gemv.py (imported by its load(): Triton is imported only when a model
is given these kernels)."""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..distributed.peer_memory import PeerSlots
from ..distributed.settings import read_settings
from .gemv import INTERPRETED
from .tuning import autotune, launch_fields, streamed_time

# (no num_stages: it does not change this kernel's code, whose loop has no tl.dot for Triton's pipeliner to stage;
# the machine code of num_stages 2, 3 and 4 is the same, so timing each only doubled the tuning)
_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_warps=w)
            for bn, bk, w in ((2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4),
                              (16, 256, 8), (16, 512, 8), (32, 256, 8), (32, 512, 8), (64, 256, 8))]
# int8 against 8-bit inputs (and int4): every program rounds x to int8 per tile, work as large as a few rows'
# weights, so tall tiles, and the inputs split over several programs where that leaves too few (4096 rows)
_DP4A_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w)
                 for bn, bk, sk, w in ((8, 512, 1, 4), (16, 256, 1, 4), (16, 512, 1, 8), (32, 256, 1, 8),
                                       (16, 512, 2, 4), (32, 256, 2, 8), (32, 512, 2, 8), (64, 256, 2, 8),
                                       (32, 256, 4, 4), (32, 512, 4, 8), (64, 256, 4, 8), (64, 512, 4, 8),
                                       (64, 256, 8, 8), (128, 256, 4, 8), (128, 256, 8, 8), (256, 256, 4, 8),
                                       (256, 256, 8, 8))]


def _config(tile: dict[str, int], warps: int, max_registers: int | None = None) -> triton.Config:
    """A tile's config, compiled within max_registers a thread where this Triton can cap them."""
    capped = max_registers is not None and "maxnreg" in inspect.signature(triton.Config).parameters
    return triton.Config(tile, num_warps=warps, **({"maxnreg": max_registers} if capped else {}))


# int4 also: small programs (2-4 warps, 8-32 rows, up to 1024 inputs), many to an SM, whose rounding of x overlaps
# the others' loads (an int4 row holds half an int8 row's bytes per rounded input), and the best of
# benchmarks/gemv_tiles.py --wide per 7B matrix; not timed for int8 yet. 32x1024 at 4 warps within 128 registers
# (four programs an SM, unspilled): on an H200, int4 b1 +2.5% (a cap of 96, which spills: -5%; benchmarks/RESULTS.md).
# Uncapped, ptxas takes 124-162 by what Triton knows of the sizes and schedules the loop otherwise. Other tiles
# uncapped: under a cap ptxas may take more registers than they use now. The last three, the best in the 7B int4
# step on an H200 (RESULTS.md): 64x512 for w1/w3 (half the programs of 32x1024, all 344 resident at once; not for
# rounding x less often: rounding it once a step lost, 36th session) and the split-K 32x1024 (capped as above) for
# wo and w2 (+5% together, 35th session); w2's 64x512 in 8 parts (512 programs, capped) once a row's parts met in
# one atomic whatever their number (+0.4-2.4%, 41st session).
_INT4_CONFIGS = [_config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, w, regs)
                 for bn, bk, sk, w, regs in ((8, 512, 1, 2, None), (16, 256, 1, 2, None), (16, 512, 1, 2, None),
                                             (8, 1024, 1, 4, None), (16, 512, 1, 4, None), (16, 1024, 1, 4, None),
                                             (32, 1024, 1, 4, 128), (8, 512, 2, 4, None), (8, 1024, 2, 4, None),
                                             (16, 1024, 4, 4, None), (64, 1024, 4, 8, None), (64, 512, 1, 4, None),
                                             (32, 1024, 4, 4, 128), (64, 512, 8, 4, 128))] + _DP4A_CONFIGS


@triton.jit
def _exact_float(v):
    """Integers |v| < 2^22 (int32) to fp32 exactly, in an integer add and a float subtraction."""
    return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _peer_sum(peer_slots_ptr, site, offsets, mask, DIM, WORLD: tl.constexpr):
    """A site's values at `offsets`: its slots summed in rank order (read from L2, where the peers' writes land)."""
    base = peer_slots_ptr + site * WORLD * DIM
    total = tl.load(base + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    for r in tl.static_range(1, WORLD):
        total += tl.load(base + r * DIM + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return total


_PTX = tl.constexpr(not INTERPRETED)  # the interpreter runs no inline PTX: it takes the same arithmetic by hand
# programmatic dependent launch (griddepcontrol): Hopper (sm_90) and later, every GPU here, unless LLAMA_DIST_PDL=0
_PDL = not INTERPRETED and read_settings().pdl and torch.cuda.is_available() and min(
    torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())) >= (9, 0)
_GDC = tl.constexpr(_PDL)


@triton.jit
def _await_inputs():
    """Wait until the kernel before this one has finished and its writes are visible. Launched as a programmatic
    dependent (PDL), a kernel may start while that one ends: before this wait, read only what it does not write
    (weights, earlier steps' cache; each kernel here releases after its wait, so all before it are done)."""
    if _GDC:
        gdc_wait()


@triton.jit
def _release_dependents():
    """Let the kernel after this one start: its programs take their places and load their first weights while
    this one streams. Called right after _await_inputs: releasing only after the loop leaves the next launch's
    start-up exposed (benchmarks/RESULTS.md)."""
    if _GDC:
        gdc_launch_dependents()


def pdl_launch() -> dict:
    """Launch options for kernels that call _await_inputs first: PDL on Hopper and later GPUs, outside
    torch.compile (whose launcher takes no such option)."""
    return {"launch_pdl": True} if _PDL and not torch.compiler.is_compiling() else {}


# The one-row kernel loads its weights as the first lines L2 gives up (evict_first): each is read once a step, and
# what is read again (x, the norms, split-K's parts, the attention's cache) stays. On an H200, b1 +0.6-1.2% (int4),
# +0.9-1.4% (int8), +1.2-1.8% (bf16); int4's group scales loaded so too lose 1.4-2.7% (benchmarks/RESULTS.md).
WEIGHTS_EVICT_FIRST = True


@triton.jit
def _load_acquire(ptr):
    """*ptr, with later loads ordered after it at system scope (what sees the peers' writes)."""
    if _PTX:
        value = tl.inline_asm_elementwise("ld.acquire.sys.global.b32 $0, [$1];", "=r,l",
                                          [ptr + tl.zeros([1], tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
        return tl.max(value, axis=0)
    return tl.atomic_add(ptr, 0, sem="acquire", scope="sys")


@triton.jit
def _wait_for_site(counters_ptr, epoch_ptr, site, WORLD: tl.constexpr):
    """Spin until every rank has published this step's part of the site (peer_memory.py's protocol)."""
    target = tl.load(epoch_ptr) * WORLD
    seen = _load_acquire(counters_ptr + site)
    while seen != target:
        seen = _load_acquire(counters_ptr + site)
    tl.debug_barrier()


@triton.jit
def _publish(peers_ptr, arrivals_ptr, site, WORLD: tl.constexpr):
    """After this program's writes to the slots: count it here, and the last of the launch tells every rank
    (one signal per rank and step, not one per program: those would queue at one address)."""
    tl.debug_barrier()  # every thread's writes before the count
    ticket = tl.atomic_add(arrivals_ptr + site, 1, sem="acq_rel", scope="sys")
    if ticket == tl.num_programs(0) - 1:
        tl.atomic_xchg(arrivals_ptr + site, 0, sem="relaxed", scope="gpu")  # the next launch counts from 0
        for r in tl.static_range(WORLD):
            counters = tl.load(peers_ptr + 2 * r + 1).to(tl.pointer_type(tl.int32))
            tl.atomic_add(counters + site, 1, sem="release", scope="sys")


@triton.jit
def _dp4a(a, b, c, SIGNED: tl.constexpr = False):
    """c + the dot product of a's four unsigned (SIGNED: signed) bytes with b's four signed bytes, in one
    instruction (dp4a)."""
    if _PTX:
        op: tl.constexpr = "dp4a.s32.s32 $0, $1, $2, $3;" if SIGNED else "dp4a.u32.s32 $0, $1, $2, $3;"
        return tl.inline_asm_elementwise(op, "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    total = c
    for i in tl.static_range(4):
        byte = ((a << (24 - 8 * i)) >> 24) if SIGNED else ((a >> (8 * i)) & 0xFF)
        total += byte * ((b << (24 - 8 * i)) >> 24)
    return total


@triton.jit
def _int8_words(x, BLOCK_K: tl.constexpr):
    """A tile of x [BLOCK_K] to int8 in groups of 32, four to a word: (the words of inputs 4j..4j+3 [BLOCK_K / 4],
    each group's scale, each group's sum of its int8 values)."""
    groups = tl.reshape(x, (BLOCK_K // 32, 32))
    scale = tl.max(tl.abs(groups), axis=1) / 127.0
    q = tl.floor(groups * tl.where(scale > 0, 1.0 / scale, 0.0)[:, None] + 0.5).to(tl.int32)
    # four bytes to a word: disjoint bits, so the sum is the bitwise or
    words = tl.sum(tl.reshape(q & 0xFF, (BLOCK_K // 4, 4)) << (8 * tl.arange(0, 4))[None, :], axis=1)
    return words, scale, tl.sum(q, axis=1)


@triton.jit
def _quantize_groups(x, BLOCK_K: tl.constexpr):
    """_int8_words packed for dp4a against int4 words: (the words of inputs 8j..8j+3, of 8j+4..8j+7, each group's
    scale, each group's sum of the int8 values)."""
    words, scale, sums = _int8_words(x, BLOCK_K)
    low, high = tl.split(tl.reshape(words, (BLOCK_K // 8, 2)))
    return low, high, scale, sums


@triton.jit
def _int8_groups_product(w, x, BLOCK_K: tl.constexpr):
    """Each row's product with x over this tile's groups of 32 [BLOCK_N, BLOCK_K / 32], before the row scales:
    int8 words w (inputs 4j..4j+3 in word j) against x in int8 per group (dp4a, signed), times x's group scales."""
    x_words, x_scale, _ = _int8_words(x, BLOCK_K)
    dots = _dp4a(w, tl.broadcast_to(x_words[None, :], w.shape), tl.zeros_like(w), SIGNED=True)
    sums = tl.sum(tl.reshape(dots, (w.shape[0], BLOCK_K // 32, 8)), axis=2)
    return x_scale[None, :] * sums.to(tl.float32)


@triton.jit
def _int4_groups_product(w, x, s_ptr, rows, row_ok, k0, N, K, BLOCK_K: tl.constexpr):
    """Each row's product with x over this tile's groups of 32 [BLOCK_N, BLOCK_K / 32]: int4 words w (byte b of
    word j: input 8j + b in its low nibble, 8j + 4 + b in its high one) against x in int8 (dp4a), then each
    group's (scale, zero) from s [groups, N, 2]: value = (q - 8) * scale + zero."""
    x_low, x_high, x_scale, x_sums = _quantize_groups(x, BLOCK_K)
    low, high = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
    dots = _dp4a(high, tl.broadcast_to(x_high[None, :], high.shape),
                 _dp4a(low, tl.broadcast_to(x_low[None, :], low.shape), tl.zeros_like(low)))
    sums = tl.sum(tl.reshape(dots, (w.shape[0], BLOCK_K // 32, 4)), axis=2)
    groups = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    ok = row_ok[:, None] & (groups < K // 32)[None, :]  # (a masked scale read past the end could be a NaN)
    if s_ptr.dtype.element_ty == tl.bfloat16:  # each (scale, zero) in one 4-byte load, widened by shifts
        pair = tl.load(s_ptr.to(tl.pointer_type(tl.int32)) + groups[None, :] * N + rows[:, None], mask=ok, other=0)
        scale = (pair << 16).to(tl.float32, bitcast=True)
        zero = (pair & -65536).to(tl.float32, bitcast=True)
    else:
        at = s_ptr + (groups[None, :] * N + rows[:, None]) * 2
        scale = tl.load(at, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(at + 1, mask=ok, other=0.0).to(tl.float32)
    x_sums = x_sums[None, :]
    return x_scale[None, :] * (scale * (sums - 8 * x_sums).to(tl.float32) + zero * x_sums.to(tl.float32))


@triton.jit
def _weights(w_ptr, rows, row_ok, k0, K, INT4: tl.constexpr, DP4A: tl.constexpr, BLOCK_K: tl.constexpr,
             EVICTION: tl.constexpr):
    """This tile of W: [BLOCK_N, BLOCK_K] values, or for INT4 [BLOCK_N, BLOCK_K / 8] words of 8 inputs, or for
    DP4A (int8) [BLOCK_N, BLOCK_K / 4] words of 4."""
    if DP4A:
        cols = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        words = tl.multiple_of(K // 4, 4)  # (K is whole groups of 32: 16-byte loads)
        w = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * words + cols[None, :],
                    mask=row_ok[:, None] & (cols < words)[None, :], other=0, eviction_policy=EVICTION)
    elif INT4:
        cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.multiple_of(K // 8, 4)  # (K is whole groups of 32: rows start 16-byte aligned, loads take 16 bytes)
        w = tl.load(w_ptr + rows[:, None] * words + cols[None, :], mask=row_ok[:, None] & (cols < words)[None, :],
                    other=0, eviction_policy=EVICTION)
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0,
                    eviction_policy=EVICTION)
    return w


@triton.jit
def _accumulate(acc, squares, w, k0, x_ptr, g_ptr, s_ptr, slots_ptr, x_site, rows, row_ok, N, K,
                SCALED: tl.constexpr, INT4: tl.constexpr, DP4A: tl.constexpr, NORM: tl.constexpr,
                GATED: tl.constexpr, WORLD: tl.constexpr, X_SLOTS: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of the product: acc += w times the tile of x (normed, gated), squares += its squares for NORM."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if X_SLOTS:
        x = _peer_sum(slots_ptr, x_site, cols, cols < K, K, WORLD)
    else:
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(x_ptr + K + cols, mask=cols < K, other=0.0).to(tl.float32)
        x = x * tl.sigmoid(x) * up
    if NORM:
        squares += x * x
        x = x * tl.load(g_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    if INT4:
        acc += _int4_groups_product(w, x, s_ptr, rows, row_ok, k0, N, K, BLOCK_K)
    elif DP4A:
        acc += _int8_groups_product(w, x, BLOCK_K)
    else:
        acc += (_exact_float(w.to(tl.int32)) if SCALED else w.to(tl.float32)) * x[None, :]
    return acc, squares


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, g_ptr, r_ptr, y_ptr, N, K, eps, sums_ptr, tickets_ptr,
                 slots_ptr, counters_ptr, arrivals_ptr, peers_ptr, epoch_ptr, x_site, r_site, y_site, rank,
                 SCALED: tl.constexpr, INT4: tl.constexpr, DP4A: tl.constexpr, NORM: tl.constexpr,
                 GATED: tl.constexpr, RESIDUAL: tl.constexpr, WORLD: tl.constexpr, X_SLOTS: tl.constexpr,
                 R_SLOTS: tl.constexpr, Y_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, EVICTION: tl.constexpr, FIXED_POINT: tl.constexpr):
    """W [N, K] dense, or int8 times one scale per row s[N] when SCALED (DP4A: against x in int8 per group of 32,
    four products per instruction: _int8_groups_product), or when INT4 int4 words [N, K / 8] with (scale, zero)
    per group of 32 in s [K / 32, N, 2] (x in int8 per group: _int4_groups_product). NORM: x is
    RMS-normalised with weight g[K]; GATED: x is [gate, up] of 2K and the input is silu(gate) * up; RESIDUAL: y += r.

    Peer slots (WORLD ranks; peer_memory.py): X_SLOTS: x is site x_site's sum (waited for); R_SLOTS: r is site
    r_site's sum (an earlier kernel of this rank waited for it); Y_SLOTS: y goes to slot `rank` of site y_site on
    every rank, and the last program to finish signals every rank.

    SPLIT_K > 1: the inputs are shared out over SPLIT_K programs per block of rows (grid axis 1); each writes its
    partial sums (and sum of squares) to its part of sums [SPLIT_K, N + row blocks] and takes a ticket in tickets
    [row blocks], and the last of a block adds the parts in order, finishes the rows as above and leaves the
    tickets zeroed for the next launch. FIXED_POINT (where neither the norm nor peer slots need the whole block's
    sums): the parts add their rows' sums in fixed point to zeroed slots in the tickets instead, one atomic a row,
    and the last to add finishes the row (_fixed_point_sum); no fence, no ticket, no read of the parts after it.

    EVICTION: the weights' L2 eviction policy (tl.load's eviction_policy)."""
    block = tl.program_id(0)
    rows = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K // 32 if INT4 or DP4A else BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    k_step = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_next = tl.program_id(1) * k_step
    k_end = tl.minimum(k_next + k_step, K)
    # the first tile of weights streams in while the kernel before this one ends (PDL) and the peers' parts arrive
    w = _weights(w_ptr, rows, row_ok, k_next, K, INT4, DP4A, BLOCK_K, EVICTION)
    _await_inputs()
    _release_dependents()
    # the residual read now, while the weights stream, not after the sums (split-K: after the ticket), where its
    # read would wait on the path every later kernel waits for (bf16 b1 +1.4-1.8%, int4 +0.4%: RESULTS.md)
    if RESIDUAL and not R_SLOTS:
        residual = tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        residual = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if X_SLOTS:
        _wait_for_site(counters_ptr, epoch_ptr, x_site, WORLD)
    acc, squares = _accumulate(acc, squares, w, k_next, x_ptr, g_ptr, s_ptr, slots_ptr, x_site, rows, row_ok,
                               N, K, SCALED, INT4, DP4A, NORM, GATED, WORLD, X_SLOTS, BLOCK_K)
    for k0 in range(k_next + BLOCK_K, k_end, BLOCK_K):
        w = _weights(w_ptr, rows, row_ok, k0, K, INT4, DP4A, BLOCK_K, EVICTION)
        acc, squares = _accumulate(acc, squares, w, k0, x_ptr, g_ptr, s_ptr, slots_ptr, x_site, rows, row_ok, N, K,
                                   SCALED, INT4, DP4A, NORM, GATED, WORLD, X_SLOTS, BLOCK_K)
    y = tl.sum(acc, axis=1)
    square_sum = tl.sum(squares, axis=0)
    if SPLIT_K > 1 and FIXED_POINT and not NORM and not R_SLOTS and not Y_SLOTS:
        y, rows_left = _fixed_point_sum(y, tickets_ptr, rows, row_ok, SPLIT_K)
        _finish(y, square_sum, rows, rows_left, s_ptr, y_ptr, N, K, eps, slots_ptr, arrivals_ptr, peers_ptr,
                r_site, y_site, rank, residual, SCALED, NORM, RESIDUAL, WORLD, R_SLOTS, Y_SLOTS)
    elif SPLIT_K > 1:  # each part to its own place, summed in a fixed order: the same result every run
        part = sums_ptr + tl.program_id(1) * (N + tl.num_programs(0))
        tl.store(part + rows, y, mask=row_ok)
        tl.store(part + N + block, square_sum)
        tl.debug_barrier()  # every thread's part before the ticket
        if tl.atomic_add(tickets_ptr + block, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            tl.atomic_xchg(tickets_ptr + block, 0, sem="relaxed")  # for the next launch
            y = tl.zeros_like(y)
            square_sum = 0.0
            for i in tl.static_range(SPLIT_K):  # (read from L2, where the other programs' parts land)
                part = sums_ptr + i * (N + tl.num_programs(0))
                y += tl.load(part + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
                square_sum += tl.load(part + N + block, cache_modifier=".cg")
            _finish(y, square_sum, rows, row_ok, s_ptr, y_ptr, N, K, eps, slots_ptr, arrivals_ptr, peers_ptr,
                    r_site, y_site, rank, residual, SCALED, NORM, RESIDUAL, WORLD, R_SLOTS, Y_SLOTS)
    else:
        _finish(y, square_sum, rows, row_ok, s_ptr, y_ptr, N, K, eps, slots_ptr, arrivals_ptr, peers_ptr,
                r_site, y_site, rank, residual, SCALED, NORM, RESIDUAL, WORLD, R_SLOTS, Y_SLOTS)


@triton.jit
def _fixed_point_sum(y, slots_ptr, rows, row_ok, SPLIT_K: tl.constexpr):
    """_gemv_kernel's FIXED_POINT split-K sums: (the sums of the rows this program finishes, those rows). Each part
    adds its rows' sums, as integers in units of 2^-20, to a zeroed int64 slot a row with one relaxed atomic: integer
    addition is associative, so the total is the same bits whatever order the parts arrive in, and the part whose
    add brings the count to SPLIT_K came last: it finishes the row and zeroes the slot. A word's bits 0-3 count the
    parts, bits 4-7 those whose sum is not finite or not within +-2^31 (more could overflow the slot; int8's sums,
    before its row scales, are at most 127 times the part's sum of |x|): such a row is NaN. Slots [N] int64."""
    tl.static_assert(SPLIT_K <= 8, "at most 8 parts: 8 x 2^51 units above 8 bits of counts fit an int64")
    slots = slots_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + rows
    fits = tl.abs(y) < 2147483648.0  # (false for NaN and inf)
    units = tl.floor(tl.where(fits, y, 0.0) * 1048576.0 + 0.5).to(tl.int64)
    word = (units << 8) + tl.where(fits, 1, 17).to(tl.int64)
    total = tl.atomic_add(slots, word, mask=row_ok, sem="relaxed", scope="gpu") + word
    last = row_ok & ((total & 15) == SPLIT_K)
    tl.store(slots, tl.zeros_like(total), mask=last)  # (for the next launch)
    return tl.where((total & 240) == 0, (total >> 8).to(tl.float32) / 1048576.0, float("nan")), last


@triton.jit
def _finish(y, square_sum, rows, row_ok, s_ptr, y_ptr, N, K, eps, slots_ptr, arrivals_ptr, peers_ptr,
            r_site, y_site, rank, residual, SCALED: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
            WORLD: tl.constexpr, R_SLOTS: tl.constexpr, Y_SLOTS: tl.constexpr):
    """The rows' sums y to outputs: the norm's 1/rms, int8's row scales, the residual (its rows as read, or the
    sum in peer slots), then y or the peer slots."""
    if NORM:
        y = y * tl.rsqrt(square_sum / K + eps)
    if SCALED:
        y = y * tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if R_SLOTS:
        y = y + _peer_sum(slots_ptr, r_site, rows, row_ok, N, WORLD)
    elif RESIDUAL:
        y = y + residual
    if Y_SLOTS:
        part = y.to(slots_ptr.dtype.element_ty)
        for r in tl.static_range(WORLD):
            slots = tl.load(peers_ptr + 2 * r).to(tl.pointer_type(slots_ptr.dtype.element_ty))
            tl.store(slots + (y_site * WORLD + rank) * N + rows, part, mask=row_ok)
        _publish(peers_ptr, arrivals_ptr, y_site, WORLD)
    else:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _peer_sum_kernel(slots_ptr, counters_ptr, epoch_ptr, y_ptr, site, DIM, WORLD: tl.constexpr,
                     BLOCK: tl.constexpr):
    """y = a site's sum, once it has arrived (the hidden state after a stage's last block)."""
    _wait_for_site(counters_ptr, epoch_ptr, site, WORLD)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = _peer_sum(slots_ptr, site, cols, cols < DIM, DIM, WORLD)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=cols < DIM)


_KEY = ["N", "K", "SCALED", "INT4", "NORM", "GATED", "RESIDUAL"]
if INTERPRETED:  # the interpreter cannot time configs: one tile (int4's inputs split in two, as on GPUs' 4096 rows)
    _gemv = _gemv_int4 = _gemv_dp4a = _gemv_kernel
    _FIXED, _INT4_FIXED = {"BLOCK_N": 8, "BLOCK_K": 64, "SPLIT_K": 1}, {"BLOCK_N": 8, "BLOCK_K": 64, "SPLIT_K": 2}
else:
    _gemv = autotune(_CONFIGS, _KEY, "gemv", do_bench=streamed_time)(_gemv_kernel)
    _gemv_int4 = autotune(_INT4_CONFIGS, _KEY, "gemv_int4", do_bench=streamed_time)(_gemv_kernel)
    _gemv_dp4a = autotune(_DP4A_CONFIGS, _KEY, "gemv_int8", do_bench=streamed_time)(_gemv_kernel)
    _FIXED = _INT4_FIXED = {}

_MAX_SPLIT = max(c.kwargs["SPLIT_K"] for c in _INT4_CONFIGS)  # (the interpreter's 2 among them)
# split-K parts of one row meet in one fixed-point atomic a row where they can (_gemv_kernel's FIXED_POINT), else by
# ticket: one round trip to L2 at the end of a split launch, not the ticket's three (benchmarks/RESULTS.md)
SPLIT_FIXED_POINT = True
_SPLIT_SUMS: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def split_sums(x: torch.Tensor, sums: int, tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial sums [>= sums] fp32, zeroed tickets [>= tickets] int32) for split-K launches on x's device, which
    leave the tickets (and the fixed-point slots among them) zeroed; one pair per device, as launches on it run one
    after another. A larger pair is added when needed, the old ones kept: CUDA graphs captured earlier still point
    at them. Traced by torch.compile (fake tensors), a pair of the compiled graph's own (a kept one would be a fake
    tensor)."""
    if is_fake(x):
        return (torch.empty(sums, dtype=torch.float32, device=x.device),
                torch.zeros(tickets, dtype=torch.int32, device=x.device))
    buffers = _SPLIT_SUMS.setdefault(x.device, [])
    if not buffers or buffers[-1][0].numel() < sums or buffers[-1][1].numel() < tickets:
        last = (buffers[-1][0].numel(), buffers[-1][1].numel()) if buffers else (0, 0)
        sums, tickets = max(sums, last[0], _MAX_SPLIT * 2 << 16), max(tickets, last[1], 1 << 16)
        buffers.append((torch.empty(sums, dtype=torch.float32, device=x.device),
                        torch.zeros(tickets, dtype=torch.int32, device=x.device)))
    return buffers[-1]


def _one_row_buffers(t: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """split_sums for a one-row launch of n rows on t's device: room for every part's sums and squares, and for an
    int64 fixed-point slot a row (two int32s) among the tickets (more than its row blocks' tickets)."""
    return split_sums(t, _MAX_SPLIT * 2 * n, 2 * n)


def tickets_left() -> int:
    """How many split-K tickets (or fixed-point slots) are set now, on every device (0 between launches: a launch
    that leaves one set breaks the next launch that shares the pair, which then never finishes some of its rows)."""
    return sum(int(tickets.count_nonzero()) for pairs in _SPLIT_SUMS.values() for _, tickets in pairs)


def _tuned(w: torch.Tensor):
    """The autotuned kernel for this weight's format (int4 words and int8 against 8-bit inputs have configs of
    their own) and the tile the interpreter takes instead of tuning."""
    if w.dtype == torch.int32:
        return _gemv_int4, _INT4_FIXED
    return (_gemv_dp4a, _INT4_FIXED) if _dp4a_rows(w) else (_gemv, _FIXED)


def _dp4a_rows(w: torch.Tensor) -> bool:
    """int8 rows whose inputs are whole groups of 32: read four to a word against x rounded to int8 per group."""
    return w.dtype == torch.int8 and w.shape[1] % 32 == 0


def _shape(w: torch.Tensor) -> tuple[int, int]:
    """(outputs, inputs) of a weight: int4 words hold 8 inputs each."""
    n, k = w.shape
    return (n, 8 * k) if w.dtype == torch.int32 else (n, k)


def _format(w: torch.Tensor, scaled: bool) -> dict:
    """The kernel's format flags, from the weight's dtype: int8 rows with scales, int32 int4 words, or dense."""
    int8 = scaled and w.dtype == torch.int8
    return {"SCALED": int8, "INT4": w.dtype == torch.int32, "DP4A": int8 and _dp4a_rows(w)}


def _weights_eviction() -> str:
    """The weights' eviction_policy for the one-row kernel's launches (WEIGHTS_EVICT_FIRST)."""
    return "evict_first" if WEIGHTS_EVICT_FIRST else ""


def plain_arguments(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, norm_weight: torch.Tensor,
                    residual: torch.Tensor, y: torch.Tensor, eps: float, scaled: bool, norm: bool, gated: bool,
                    add: bool) -> tuple[list, dict]:
    """The one-row kernel's arguments for a launch without peer slots, all but the tile: (positional, keyword)."""
    n, k = _shape(w)
    sums, tickets = _one_row_buffers(x, n)
    return ([x, w, scales, norm_weight, residual, y, n, k, eps, sums, tickets, x, x, x, x, x, 0, 0, 0, 0],
            {**_format(w, scaled), "NORM": norm, "GATED": gated, "RESIDUAL": add, "WORLD": 0, "X_SLOTS": False,
             "R_SLOTS": False, "Y_SLOTS": False, "EVICTION": _weights_eviction(), "FIXED_POINT": SPLIT_FIXED_POINT,
             **pdl_launch()})


@torch.library.triton_op("llama_dist::gemv", mutates_args={})
def gemv_op(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, norm_weight: torch.Tensor,
            residual: torch.Tensor, eps: float, scaled: bool, norm: bool, gated: bool,
            add: bool, fp32_out: bool = False) -> torch.Tensor:
    """x [1, in] (or [1, 2 * in] when gated) -> [1, out], in x's dtype or float32. Tensors whose flag is off are
    unused. The weight's dtype says its format: int8 with per-row scales, int32 int4 words with group scales (both
    `scaled`), or dense."""
    n = _shape(w)[0]
    y = torch.empty((1, n), dtype=torch.float32 if fp32_out else x.dtype, device=x.device)
    args, flags = plain_arguments(x, w, scales, norm_weight, residual, y, eps, scaled, norm, gated, add)
    kernel, fixed = _tuned(w)
    torch.library.wrap_triton(kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](
        *args, **flags, **fixed)
    return y


_TILES: dict[tuple, dict] = {}  # (n, k, flags, dtypes) -> the plain kernel's tuned tile, for peer-slot launches


def _tile(w: torch.Tensor, k_in: int, dtype: torch.dtype, scaled: bool, norm: bool, gated: bool,
          add: bool) -> dict:
    """The tile the autotuner picks for the plain kernel of this shape. A kernel that writes peers' slots must
    run exactly once per step, so it cannot be timed itself; the plain one is tuned here on scratch data."""
    if INTERPRETED:
        return dict(_tuned(w)[1])
    n, k = _shape(w)
    key = (n, k, w.dtype, dtype, scaled, norm, gated, add)
    if key not in _TILES:
        scratch = torch.zeros(max(n + k_in, 2 * n * k // 32), dtype=dtype, device=w.device)
        scales = scratch[:2 * n * k // 32 if w.dtype == torch.int32 else n]
        gemv_op(scratch[None, :k_in], w, scales, scratch[:k], scratch[None, :n], 1e-5, scaled, norm, gated, add)
        _TILES[key] = launch_fields(_tuned(w)[0].best_config)
    return _TILES[key]


def gemv_peers(x: torch.Tensor | None, w: torch.Tensor, scales: torch.Tensor | None,
               norm_weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float, gated: bool,
               peer: PeerSlots, x_site: int | None, r_site: int | None, y_site: int | None,
               dtype: torch.dtype) -> torch.Tensor | None:
    """gemv_op with peer slots for any of its input (x_site), residual (r_site) and output (y_site); x and
    residual are None where read from slots. Returns y [1, out], or None when it went to the slots. Not an op:
    a compiled step all-reduces between kernels instead (its tuning and recording cannot run this)."""
    n, k = _shape(w)
    stand_in = peer.slots  # any tensor, for the pointers a flag leaves unused
    add = residual is not None or r_site is not None
    tile = _tile(w, 2 * k if gated else k, dtype, scales is not None, norm_weight is not None, gated, add)
    y = torch.empty((1, n), dtype=dtype, device=w.device) if y_site is None else None
    sums, tickets = _one_row_buffers(w, n)
    _gemv_kernel[(triton.cdiv(n, tile["BLOCK_N"]), tile["SPLIT_K"])](
        stand_in if x is None else x, w, stand_in if scales is None else scales,
        stand_in if norm_weight is None else norm_weight, stand_in if residual is None else residual,
        stand_in if y is None else y, n, k, eps, sums, tickets, peer.slots, peer.counters, peer.arrivals, peer.peers,
        peer.epoch,
        x_site or 0, r_site or 0, y_site or 0, peer.rank,
        **_format(w, scales is not None), NORM=norm_weight is not None, GATED=gated,
        RESIDUAL=residual is not None,
        WORLD=peer.world_size, X_SLOTS=x_site is not None, R_SLOTS=r_site is not None,
        Y_SLOTS=y_site is not None, EVICTION=_weights_eviction(), FIXED_POINT=SPLIT_FIXED_POINT, **tile, **pdl_launch())
    return y


def peer_sum(peer: PeerSlots, site: int) -> torch.Tensor:
    """A site's sum as a tensor [1, dim], once every rank's part has arrived."""
    dim = peer.slots.shape[-1]
    y = torch.empty((1, dim), dtype=peer.slots.dtype, device=peer.slots.device)
    block = 1024
    _peer_sum_kernel[(triton.cdiv(dim, block),)](peer.slots, peer.counters, peer.epoch, y, site, dim,
                                                 WORLD=peer.world_size, BLOCK=block)
    return y
