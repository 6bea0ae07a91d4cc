"""The Triton kernels and ops behind kernels/quant_matmul.py (imported by its load(), so Triton is imported only
when a model is given these kernels)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemv import INTERPRETED
from .gemv_triton import _PTX, _exact_float, _weights, split_sums
from .tuning import autotune

try:  # (Triton 3.4 on: tiles by TMA, described on the host)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# autotuning keys on rows rounded up to a power of 2, from MIN_ROWS_BUCKET to MAX_ROWS_BUCKET, so that new batch
# sizes reuse a tuning; up to 8 rows every tile has more rows than the product (16 at least), and 2, 4 and 8 rows
# picked the same tiles (timing them was a third of this kernel's tuning at a quantized model's first start)
MIN_ROWS_BUCKET, MAX_ROWS_BUCKET = 8, 128
# int8 products of more rows than a decode step's, up to this many: _int8_rows_kernel (on Hopper), which writes no
# dequantized copy; past it the copy costs less than the arithmetic cuBLAS does faster (RESULTS.md, 42nd session)
INT8_ROWS = 256


@triton.jit
def _int4_tile(w_ptr, sz_ptr, rows, row_ok, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows `rows` of the int4 matrix over inputs k0..k0+BLOCK_K as fp32 values [BLOCK_N, BLOCK_K], from words
    [N, K / 8] (byte b of word j: input 8j + b in its low nibble, 8j + 4 + b in its high one) and (scale, zero)
    [K / 32, N, 2]: value = (q - 8) * scale + zero. Whole words and one pair per group are loaded (an
    element-wise kernel that loads a word per value ran at half the speed)."""
    words = _weights(w_ptr, rows, row_ok, k0, K, True, False, BLOCK_K, "")
    i = tl.arange(0, 8)  # input 8j + i sits at bit 8 (i % 4) + 4 (i // 4) of word j
    q = (words[:, :, None] >> (8 * (i % 4) + 4 * (i // 4))[None, None, :]) & 0xF
    groups = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    at = sz_ptr + (groups[None, :] * N + rows[:, None]) * 2
    ok = row_ok[:, None] & (groups < K // 32)[None, :]  # (a masked pair read past the end could be a NaN)
    scale = tl.load(at, mask=ok, other=0.0).to(tl.float32)[:, :, None]
    zero = tl.load(at + 1, mask=ok, other=0.0).to(tl.float32)[:, :, None]
    q = tl.reshape(_exact_float(q), (BLOCK_N, BLOCK_K // 32, 32))
    return tl.reshape((q - 8.0) * scale + zero, (BLOCK_N, BLOCK_K))


@triton.jit
def _quant_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, sums_ptr, tickets_ptr, M, N, K, ROWS_BUCKET,
                         INT4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
    """y [M, N] = x [M, K] W^T, W's tiles converted in registers into a tensor-core product in x's dtype: int8 W
    [N, K] with one scale per row (int8 values are exact in bf16; the scales multiply the finished sums), or int4
    words [N, K / 8] with (scale, zero) per group of 32 (_int4_tile's values, rounded to x's dtype as the
    dequantized matrix is). With SPLIT_K > 1 each program takes a part of K (so that matrices of few outputs
    fill the GPU), writes its partial tile to sums [SPLIT_K, M, N] and takes a ticket in tickets[tile]; the last
    of a tile's parts adds them in a fixed order (the same result every run) and leaves the ticket zeroed.

    SWAP: the tile is computed as (W x^T)^T [BLOCK_N, BLOCK_M]. Hopper's wgmma takes a left operand of 64 rows
    from registers, where the converted weights are; x W^T leaves it 16 or 32 rows, and Triton then multiplies
    with mma.sync, the weights' tile staged through shared memory first."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_step = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_first = tl.program_id(2) * k_step
    # the output's rows and columns, laid out as the accumulator is
    out_rows, out_cols = (rows[None, :], cols[:, None]) if SWAP else (rows[:, None], cols[None, :])
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_first, tl.minimum(k_first + k_step, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)
        if INT4:
            w = _int4_values(w_ptr, s_ptr, x_ptr, cols, cols < N, k0, N, K, BLOCK_N, BLOCK_K)
        else:
            w = _exact_float(_weights(w_ptr, cols, cols < N, k0, K, False, False, BLOCK_K, "").to(tl.int32))
        w = w.to(x.dtype)
        acc += _dot(w, tl.trans(x)) if SWAP else _dot(x, tl.trans(w))
    at = out_rows * N + out_cols
    ok = (out_rows < M) & (out_cols < N)
    if SPLIT_K > 1:
        tl.store(sums_ptr + tl.program_id(2) * M * N + at, acc, mask=ok)
        tl.debug_barrier()  # every thread's part before the ticket
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(tickets_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            tl.atomic_xchg(tickets_ptr + tile, 0, sem="relaxed")  # for the next launch
            acc = tl.zeros_like(acc)
            for i in tl.static_range(SPLIT_K):  # (read from L2, where the other programs' parts land)
                acc += tl.load(sums_ptr + i * M * N + at, mask=ok, other=0.0, cache_modifier=".cg")
            _store_tile(acc, s_ptr, y_ptr, at, ok, out_cols, N, INT4)
    else:
        _store_tile(acc, s_ptr, y_ptr, at, ok, out_cols, N, INT4)


@triton.jit
def _dot(a, b):
    """a b on tensor cores, in fp32; the interpreter multiplies bf16 tiles as their bit patterns, so it takes
    them as fp32 (the same values)."""
    if _PTX:
        return tl.dot(a, b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32))


@triton.jit
def _store_tile(acc, s_ptr, y_ptr, at, ok, out_cols, N, INT4: tl.constexpr):
    """The finished sums to y, times int8's row scales (out_cols: the output columns, shaped as acc's)."""
    if not INT4:
        acc = acc * tl.load(s_ptr + out_cols, mask=out_cols < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + at, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _int8_rows_kernel(x_desc, w_desc, y_desc, s_ptr, N, K, ROWS_BUCKET, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [M, N] = x [M, K] q^T times q's row scales, for a prompt's rows: x's and q's tiles arrive by TMA
    (pipelined over K by Triton), the int8 tile is converted in registers and is wgmma's left operand (Hopper
    takes that one from registers), so the tile computed is (q x^T)^T. No dequantized copy of the matrix is
    written and read back: up to INT8_ROWS rows that copy costs more than cuBLAS's faster arithmetic saves.
    Programs next to each other take the same weight tile (the rows' tiles vary fastest), so q is read once."""
    row0, col0 = tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # (TMA fills tiles past the edges with zeros)
        x, w = x_desc.load([row0, k0]), w_desc.load([col0, k0])
        if _PTX:  # (the interpreter's int8 -> bf16 gives NaNs; _dot takes its tiles in fp32 anyway)
            w = w.to(x.dtype)
        acc += _dot(w, tl.trans(x))
    cols = col0 + tl.arange(0, BLOCK_N)
    acc = acc * tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[:, None]
    y_desc.store([row0, col0], tl.trans(acc).to(y_desc.dtype))


def _bf16_pairs_asm() -> str:
    """The PTX behind _int4_tile_bf16, for one word $8 with (scale, scale) $9 and (zero, zero) $10: for each shift
    s, the nibbles at bits s and 16 + s (inputs i and i + 2 of the word's 8) become the bf16 pair 128 + q by bit
    patterns, less 136 exactly, then times the scale plus the zero, rounded once, into outputs $i and $(i + 2)."""
    lines = [".reg .b32 one, off, p;", "mov.b32 one, 0x3F803F80;", "mov.b32 off, 0xC308C308;"]
    for shift, low in ((0, 0), (4, 4), (8, 1), (12, 5)):
        lines += [f"shr.u32 p, $8, {shift};"] if shift else ["mov.b32 p, $8;"]
        # (p & 0x000F000F) | 0x43004300 in one instruction: 0xEA is the truth table of (a & b) | c
        lines += ["lop3.b32 p, p, 0x000F000F, 0x43004300, 0xEA;", "fma.rn.bf16x2 p, p, one, off;",
                  "fma.rn.bf16x2 p, p, $9, $10;",
                  f"mov.b32 {{${low}, ${low + 2}}}, p;"]
    return "{\n" + "\n".join(lines) + "\n}"


_BF16_PAIRS = tl.constexpr(_bf16_pairs_asm())


@triton.jit
def _nibble_pair(words, scales, zeros, shift: tl.constexpr):
    """What _BF16_PAIRS makes of the nibbles at bits shift and 16 + shift, for the interpreter."""
    scale = (scales << 16).to(tl.float32, bitcast=True)
    zero = (zeros & -65536).to(tl.float32, bitcast=True)
    low = ((words >> shift) & 0xF).to(tl.float32)
    high = ((words >> (shift + 16)) & 0xF).to(tl.float32)
    return ((low - 8.0) * scale + zero).to(tl.bfloat16), ((high - 8.0) * scale + zero).to(tl.bfloat16)


@triton.jit
def _int4_tile_bf16(w_ptr, sz_ptr, rows, row_ok, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_int4_tile's values in bf16 [BLOCK_N, BLOCK_K], two at a time: the two nibbles at bits s and 16 + s of a
    word, or'ed into 0x4300 halves, are the bf16 pair 128 + q; one bf16x2 fused multiply-add takes 136 off
    (exact), another gives (q - 8) * scale + zero rounded once. Per weight a shift, a mask and an or per two, and
    two multiply-adds per two: no conversion instruction. (scale, zero) pairs [K / 32, N, 2] must be bf16."""
    words = _weights(w_ptr, rows, row_ok, k0, K, True, False, BLOCK_K, "")
    groups = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    ok = row_ok[:, None] & (groups < K // 32)[None, :]  # (a masked pair read past the end could be a NaN)
    pair = tl.load(sz_ptr.to(tl.pointer_type(tl.int32)) + groups[None, :] * N + rows[:, None], mask=ok, other=0)
    scales = (pair & 0xFFFF) | (pair << 16)  # (scale, scale)
    zeros = ((pair >> 16) & 0xFFFF) | (pair & -65536)  # (zero, zero)
    shape: tl.constexpr = (BLOCK_N, BLOCK_K // 32, 4)
    words = tl.reshape(words, shape)
    scales = tl.broadcast_to(scales[:, :, None], shape)
    zeros = tl.broadcast_to(zeros[:, :, None], shape)
    if _PTX:
        bf16 = tl.bfloat16
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _BF16_PAIRS, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, scales, zeros],
            dtype=(bf16, bf16, bf16, bf16, bf16, bf16, bf16, bf16), is_pure=True, pack=1)
    else:  # the interpreter runs no PTX: the same values by hand, in the same order
        v0, v2 = _nibble_pair(words, scales, zeros, 0)
        v4, v6 = _nibble_pair(words, scales, zeros, 4)
        v1, v3 = _nibble_pair(words, scales, zeros, 8)
        v5, v7 = _nibble_pair(words, scales, zeros, 12)
    # inputs 8c + i in order: joins add a last dimension each, the first standing for i's bit 2, the last bit 0
    v = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(v, (BLOCK_N, BLOCK_K))


@triton.jit
def _int4_values(w_ptr, sz_ptr, like_ptr, rows, row_ok, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The int4 tile's values for a product or copy in like_ptr's dtype: two at a time in bf16 where that dtype and
    the (scale, zero) pairs are bf16 (_int4_tile_bf16), else in fp32 (_int4_tile)."""
    if like_ptr.dtype.element_ty == tl.bfloat16 and sz_ptr.dtype.element_ty == tl.bfloat16:
        values = _int4_tile_bf16(w_ptr, sz_ptr, rows, row_ok, k0, N, K, BLOCK_N, BLOCK_K)
    else:
        values = _int4_tile(w_ptr, sz_ptr, rows, row_ok, k0, N, K, BLOCK_N, BLOCK_K)
    return values


@triton.jit
def _dequantize_kernel(w_ptr, sz_ptr, y_ptr, N, K, INT4: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """y [N, K] = the matrix's values: int8 W times its row scales, or the int4 matrix's from its words and group
    pairs (_int4_values); rounded once to y's dtype."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    ok = (rows < N)[:, None] & (ks < K)[None, :]
    if INT4:
        y = _int4_values(w_ptr, sz_ptr, y_ptr, rows, rows < N, k0, N, K, BLOCK_N, BLOCK_K)
    else:
        y = _exact_float(_weights(w_ptr, rows, rows < N, k0, K, False, False, BLOCK_K, "").to(tl.int32))
        y = y * tl.load(sz_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows[:, None] * K + ks[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def _fits(configs, named_args, **kwargs):
    """No more rows to a tile than the bucket needs; parts of K only where the output tiles are too few to fill
    the GPU."""
    args = {**named_args, **kwargs}
    rows, n = args["ROWS_BUCKET"], args["N"]
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, rows)
           and (c.kwargs["SPLIT_K"] == 1 or triton.cdiv(n, c.kwargs["BLOCK_N"]) < _sm_count())]
    return fit or configs[:1]


@functools.cache
def _sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


# (SWAP only for tiles of 16 and 32 rows: 64 already give wgmma its left operand plainly)
_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "SWAP": swap}, num_warps=w,
                          num_stages=s)
            for bm, bn, bk, w, splits in ((16, 64, 128, 4, (1, 2, 4)), (16, 128, 128, 4, (1, 2, 4)),
                                          (16, 64, 256, 4, (1, 2, 4)), (32, 64, 128, 4, (1, 2)),
                                          (32, 128, 128, 4, (1,)), (64, 64, 128, 4, (1, 2)), (64, 128, 128, 8, (1,)))
            for sk in splits for s in (3, 4) for swap in ((False, True) if bm < 64 else (False,))]
_MAX_SPLIT = max(c.kwargs["SPLIT_K"] for c in _CONFIGS)
# 16x512/4 and 32x512/8: the best on 7B's matrices on an H200, 5% faster a layer than the four before (RESULTS.md)
_DEQUANTIZE_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                       for bn, bk, w in ((8, 512, 4), (16, 256, 4), (32, 256, 4), (32, 256, 8), (16, 512, 4),
                                         (32, 512, 8))]


def _tile_blocks(args: dict) -> None:
    """A config's tile shapes onto the TMA descriptors of a launch (run before each: the tiles are the config's)."""
    m, n, k = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    args["x_desc"].block_shape, args["w_desc"].block_shape, args["y_desc"].block_shape = [m, k], [n, k], [m, n]


def _rows_fit(configs, named_args, **kwargs):
    """No more rows to a tile than the bucket has (64 at least)."""
    rows = {**named_args, **kwargs}["ROWS_BUCKET"]
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, rows)] or configs[:1]


# the fastest on 7B's matrices at 128-512 rows on an H200 (RESULTS.md, 42nd session): (rows, weight rows, K, warps,
# stages)
_ROWS_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s,
                               pre_hook=_tile_blocks)
                 for bm, bn, bk, w, s in ((64, 64, 128, 4, 4), (128, 64, 64, 4, 4), (128, 128, 128, 8, 3),
                                          (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (256, 128, 64, 8, 4),
                                          (256, 64, 64, 4, 4))]
if INTERPRETED:  # the interpreter cannot time configs: one tile, K in two parts
    _quant_matmul, _FIXED = _quant_matmul_kernel, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2,
                                                        "SWAP": False}
    _dequantize, _DEQUANTIZE_FIXED = _dequantize_kernel, {"BLOCK_N": 8, "BLOCK_K": 64}
    _int8_rows, _ROWS_FIXED = _int8_rows_kernel, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32}
else:
    _quant_matmul = autotune(_CONFIGS, ["ROWS_BUCKET", "N", "K", "INT4"], "quant_matmul",
                             prune_configs_by={"early_config_prune": _fits})(_quant_matmul_kernel)
    _dequantize = autotune(_DEQUANTIZE_CONFIGS, ["N", "K", "INT4"], "dequantize")(_dequantize_kernel)
    _int8_rows = autotune(_ROWS_CONFIGS, ["ROWS_BUCKET", "N", "K"], "int8_rows",
                          prune_configs_by={"early_config_prune": _rows_fit})(_int8_rows_kernel)
    _FIXED, _DEQUANTIZE_FIXED, _ROWS_FIXED = {}, {}, {}


def _tiles_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, n: int, int4: bool) -> torch.Tensor:
    """The launch behind int8_matmul and int4_matmul."""
    m, k = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    sums, tickets = split_sums(x, _MAX_SPLIT * m * n, m * n)
    bucket = min(MAX_ROWS_BUCKET, max(MIN_ROWS_BUCKET, triton.next_power_of_2(m)))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])  # noqa
    torch.library.wrap_triton(_quant_matmul)[grid](x, w, scales, y, sums, tickets, m, n, k, bucket, INT4=int4,
                                                   **_FIXED)
    return y


@torch.library.triton_op("llama_dist::int8_matmul", mutates_args={})
def int8_matmul_op(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> [M, N] through int8 q [N, K] with one scale per row [N]."""
    return _tiles_matmul(x, q, scales, q.shape[0], int4=False)


@torch.library.triton_op("llama_dist::int4_matmul", mutates_args={})
def int4_matmul_op(x: torch.Tensor, words: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> [M, N] through int4 words [N, K / 8] with (scale, zero) per group of 32 [K / 32, N, 2]."""
    return _tiles_matmul(x, words, scales_zeros, words.shape[0], int4=True)


@torch.library.triton_op("llama_dist::dequantize", mutates_args={})
def dequantize_op(w: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The matrix [N, K] in `dtype`: int8 W [N, K] times its row scales [N], or int4 words [N, K / 8] (int32)
    with (scale, zero) per group of 32 [K / 32, N, 2], dequantized."""
    int4 = w.dtype == torch.int32
    n, k = (w.shape[0], 8 * w.shape[1]) if int4 else w.shape
    y = torch.empty((n, k), dtype=dtype, device=w.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    torch.library.wrap_triton(_dequantize)[grid](w, scales_zeros, y, n, k, INT4=int4, **_DEQUANTIZE_FIXED)
    return y


def _tma_fits(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether _int8_rows_kernel takes these operands: 16-bit activations (fp32 ones would meet tf32 tensor cores),
    rows TMA can describe (16-byte aligned starts and row strides), and a GPU with TMA (Hopper on)."""
    return (TensorDescriptor is not None and x.dtype in (torch.bfloat16, torch.float16) and q.shape[0] % 8 == 0
            and all(t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
                    for t in (x, q))
            and (INTERPRETED or torch.cuda.get_device_capability(x.device) >= (9, 0)))


@torch.library.custom_op("llama_dist::int8_rows", mutates_args=())
def int8_rows_op(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> [M, N] through int8 q [N, K] with one scale per row [N], for more rows than a decode step's: up
    to INT8_ROWS through _int8_rows_kernel where it takes them, else the matrix dequantized, then cuBLAS. Opaque
    to torch.compile, which would rebuild the TMA descriptors with other tiles than the tuner's."""
    (m, k), n = x.shape, q.shape[0]
    if m > INT8_ROWS or not _tma_fits(x, q):  # (the scales in the matrix: one rounding a weight)
        return F.linear(x, dequantize_op(q, scales, x.dtype))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    descriptors = {name: TensorDescriptor.from_tensor(t, [1, 1]) for name, t in (("x_desc", x), ("w_desc", q),
                                                                                  ("y_desc", y))}
    _tile_blocks({**descriptors, **(_ROWS_FIXED or _ROWS_CONFIGS[0].kwargs)})  # (a tuned launch sets its config's)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _int8_rows[grid](*descriptors.values(), scales, n, k, triton.next_power_of_2(m), **_ROWS_FIXED)
    return y


@int8_rows_op.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))
