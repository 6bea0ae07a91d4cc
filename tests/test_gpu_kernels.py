"""Our CUDA decode kernels (Triton), run by Triton's CPU interpreter: CI has no GPU.

Their speed is a GPU-only question (benchmarks/gemv_kernels.py); here: the values, with masked edges
(an input length that is not a multiple of the tile, fewer rows than a tile), dense and int8, and the work it
folds in (RMSNorm of the input, SwiGLU of a [gate, up] input, a residual) against the model's own modules; the
decode attention against SDPA; a whole model's decode steps through both against the step-by-step path. Some
are compiled for sm_90 instead (Triton's wheel carries ptxas), where the question is the GPU code itself: the
arguments torch.compile passes, the order of the programmatic-launch instructions."""
import inspect
import os
import re
import subprocess
import sys

import pytest

from .helpers import ATTENTION_CONSTANTS, ATTENTION_POINTERS, ROOT

# Triton 3.6's interpreter (the version torch 2.11's CUDA wheels pin) cannot take loop bounds computed by
# tl.minimum, as the split-K kernels' are; the kernels themselves compile there (benchmarks/kernel_ptx.py)
pytest.importorskip("triton", minversion="3.7")

SCRIPT = """
import torch
from llama_dist.kernels.gemv import gemv, load
assert load()
from llama_dist.quant.weights import int8_quantize
from llama_dist.model.transformer import RMSNorm
g = torch.Generator().manual_seed(0)


def int8_groups(x):  # the kernel's activation rounding, step by step: int8 per group of 32, round half up
    g = x.reshape(-1, 32)
    scale = g.abs().amax(-1, keepdim=True) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.floor(g * inverse + 0.5) * scale).reshape(x.shape)


for n, k in ((40, 288), (3, 64), (17, 1000)):  # one row: the kernel's case
    x, w = torch.randn(1, 1, k, generator=g), torch.randn(n, k, generator=g)
    y = gemv(x, w)
    assert y.shape == (1, 1, n), y.shape
    assert (y - x @ w.t()).abs().max() < 1e-4 * (x @ w.t()).abs().max(), (n, k)
    q, s = int8_quantize(w)
    dense8 = q.float() * s[:, None]
    # int8 rows of whole groups of 32 meet x rounded to int8 per group (dp4a), exactly so and close to x as it
    # is; other lengths take x as it is
    act = int8_groups if k % 32 == 0 else (lambda v: v)
    ref, exact = act(x) @ dense8.t(), x @ dense8.t()
    assert (gemv(x, q, s) - ref).abs().max() < 1e-4 * ref.abs().max(), (n, k)
    assert (gemv(x, q, s) - exact).abs().max() < 2e-2 * exact.abs().max(), (n, k)
    norm = RMSNorm(k, 1e-5)
    norm.weight.copy_(torch.rand(k, generator=g) + 0.5)
    ref = norm(x * 3) @ w.t()
    y = gemv(x * 3, w, norm_weight=norm.weight, eps=norm.eps)
    assert (y - ref).abs().max() < 1e-4 * ref.abs().max(), (n, k)
    gate_up, r = torch.randn(1, 1, 2 * k, generator=g), torch.randn(1, 1, n, generator=g)
    ref = r + act(torch.nn.functional.silu(gate_up[..., :k]) * gate_up[..., k:]) @ dense8.t()
    y = gemv(gate_up, q, s, gated=True, residual=r)
    assert (y - ref).abs().max() < 1e-4 * ref.abs().max(), (n, k)
# int4 groups of 32 (words for dp4a, x in int8 per group): exactly the int8-activation arithmetic, and close to
# the dequantized matrix's product
from llama_dist.quant.weights import int4_dequantize, int4_quantize, int4_words

for n, k in ((40, 288), (3, 64), (70, 1024)):
    w = torch.randn(n, k, generator=g)
    q, scales, zeros = int4_quantize(w, 32)
    words, sz = int4_words(q), torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
    dense = int4_dequantize(q, scales, zeros)
    x, r = torch.randn(1, 1, k, generator=g) * 3, torch.randn(1, 1, n, generator=g)
    norm = RMSNorm(k, 1e-5)
    norm.weight.copy_(torch.rand(k, generator=g) + 0.5)
    normed = x * norm.weight
    want = int8_groups(normed) @ dense.t() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) + r
    got = gemv(x, words, sz, norm_weight=norm.weight, eps=norm.eps, residual=r)
    assert got.shape == (1, 1, n) and (got - want).abs().max() < 1e-4 * want.abs().max(), (n, k)
    exact = norm(x) @ dense.t() + r
    assert (got - exact).abs().max() < 3e-2 * exact.abs().max(), (n, k, (got - exact).abs().max())
    gate_up = torch.randn(1, 1, 2 * k, generator=g)
    act = torch.nn.functional.silu(gate_up[..., :k]) * gate_up[..., k:]
    want = int8_groups(act) @ dense.t()
    assert (gemv(gate_up, words, sz, gated=True) - want).abs().max() < 1e-4 * want.abs().max(), (n, k)
    # bf16 pairs (a GPU's): each read as one 4-byte word and widened by shifts, the same values as fp32 ones
    sz16 = sz.to(torch.bfloat16)
    assert torch.equal(gemv(x, words, sz16), gemv(x, words, sz16.float())), (n, k)
    # bf16 activations, float32 out (logits): the bf16 result's bits and more
    x16, norm16 = x.bfloat16(), norm.weight.bfloat16()
    y16 = gemv(x16, words, sz16, norm_weight=norm16, eps=norm.eps)
    y32 = gemv(x16, words, sz16, norm_weight=norm16, eps=norm.eps, fp32_out=True)
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32, (n, k)
    assert ((y32 - y16.float()).abs() <= y32.abs() * 2 ** -7).all() and not torch.equal(y32, y16.float()), (n, k)
# several rows of int8 through the tensor-core kernel (fewer than a tile, more than one tile, ragged edges)
from llama_dist.kernels.quant_matmul import load as load_quantized
assert load_quantized()
from llama_dist.kernels import quant_matmul_triton
for swap in (False, True):  # x W^T, or (W x^T)^T: the weights' tile as the left operand
    quant_matmul_triton._FIXED["SWAP"] = swap
    for rows, n, k in ((3, 40, 256), (20, 17, 96), (33, 9, 1000)):
        x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
        q, s = int8_quantize(w)
        ref = x @ (q.float() * s[:, None]).t()
        got = torch.ops.llama_dist.int8_matmul(x, q, s)
        assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5 * ref.abs().max(), (rows, n, k)
    # several rows of int4 through the same kernel: bf16 rows take the values two at a time (the interpreter computes
    # them by hand, in the asm's order), others the fp32 tile; both are the dequantized matrix's values
    for rows, n, k in ((3, 40, 256), (20, 17, 96), (33, 9, 320)):
        q, scales, zeros = int4_quantize(torch.randn(n, k, generator=g), 32)
        scales, zeros = scales.to(torch.bfloat16), zeros.to(torch.bfloat16)
        sz = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
        dense = int4_dequantize(q, scales.float(), zeros.float())
        x = torch.randn(rows, k, generator=g)
        got = torch.ops.llama_dist.int4_matmul(x, int4_words(q), sz.float())
        ref = x @ dense.t()
        assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5 * ref.abs().max(), (rows, n, k)
        xb = x.to(torch.bfloat16)
        got = torch.ops.llama_dist.int4_matmul(xb, int4_words(q), sz)
        ref = xb.float() @ dense.to(torch.bfloat16).float().t()
        # (Triton's interpreter converts fp32 to bf16 by truncation, not to nearest: up to a bf16 step in each
        # weight and in the output, ~1e-2 of the largest output; on GPUs, benchmarks/gemv_kernels.py: ~3e-3)
        assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() < 2e-2 * ref.abs().max(), (rows, n, k)
# whole matrices dequantized for a prompt's product: int8 values times their row scales, int4 words, both to the
# very values of the reference dequantization (ragged tiles in both dimensions)
for n, k in ((40, 288), (9, 1024)):
    q, s = int8_quantize(torch.randn(n, k, generator=g))
    assert torch.equal(torch.ops.llama_dist.dequantize(q, s, torch.float32), q.float() * s[:, None])
    q, scales, zeros = int4_quantize(torch.randn(n, k, generator=g), 32)
    sz = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
    got = torch.ops.llama_dist.dequantize(int4_words(q), sz, torch.float32)
    assert torch.equal(got, int4_dequantize(q, scales, zeros)), (n, k)
    # into bf16 from bf16 pairs, two at a time: the values rounded once (the interpreter truncates: a bf16 step)
    scales, zeros, sz = scales.to(torch.bfloat16), zeros.to(torch.bfloat16), sz.to(torch.bfloat16)
    got = torch.ops.llama_dist.dequantize(int4_words(q), sz, torch.bfloat16)
    dense = int4_dequantize(q, scales.float(), zeros.float())
    assert got.dtype == torch.bfloat16 and ((got.float() - dense).abs() <= dense.abs() / 128).all(), (n, k)
# a prompt's int8 rows (more than a decode step's, up to INT8_ROWS) through the TMA kernel: the products in fp32 of
# the exact int8 and bf16 values times the row scales, rounded once (the interpreter truncates: within a bf16 step);
# ragged row, column and K tiles. Rows it does not take (columns not a multiple of 8, fp32 activations, more than
# INT8_ROWS rows) are the dequantized matrix's product, bit for bit
assert quant_matmul_triton.INT8_ROWS < 300
for rows, n, k in ((70, 40, 288), (33, 24, 1008), (20, 20, 64), (300, 16, 64)):
    q, s = int8_quantize(torch.randn(n, k, generator=g))
    s, x = s.to(torch.bfloat16), torch.randn(rows, k, generator=g).to(torch.bfloat16)
    got = torch.ops.llama_dist.int8_rows(x, q, s)
    tree = torch.nn.functional.linear(x, torch.ops.llama_dist.dequantize(q, s, torch.bfloat16))
    if n % 8 or rows > quant_matmul_triton.INT8_ROWS:
        assert torch.equal(got, tree), (rows, n, k)
        continue
    ref = (x.float() @ q.float().t()) * s.float()
    assert got.dtype == torch.bfloat16 and ((got.float() - ref).abs() <= ref.abs() * 2 ** -7).all(), (rows, n, k)
    assert not torch.equal(got, tree), (rows, n, k)  # (the tree rounds each weight times its scale to bf16 first)
    x32 = x.float()
    assert torch.equal(torch.ops.llama_dist.int8_rows(x32, q, s),
                       torch.nn.functional.linear(x32, torch.ops.llama_dist.dequantize(q, s, torch.float32)))
# split-K parts meeting in one fixed-point atomic a row (2, 4 and 8 parts, the residual and int8's row scales folded
# in): the ticket's rows, to within the fixed point's 2^-21 a part
import triton
from llama_dist.kernels import gemv_triton
q, scales, zeros = int4_quantize(torch.randn(40, 512, generator=g), 32)
int4 = (int4_words(q), torch.stack([scales, zeros], -1).transpose(0, 1).contiguous())
int8 = int8_quantize(torch.randn(40, 512, generator=g))


def split_rows(x, w, s, r, split, fixed):
    y = torch.empty(1, 40)
    args, flags = gemv_triton.plain_arguments(x, w, s, x, r, y, 1e-5, scaled=s is not None, norm=False, gated=False,
                                              add=True)
    gemv_triton._gemv_kernel[(triton.cdiv(40, 8), split)](
        *args, **{**flags, "FIXED_POINT": fixed, "BLOCK_N": 8, "BLOCK_K": 64, "SPLIT_K": split})
    return y


for w, s in (int4, int8):
    x, r = torch.randn(1, 512, generator=g), torch.randn(1, 40, generator=g)
    for split in (2, 4, 8):
        fixed, ticket = split_rows(x, w, s, r, split, True), split_rows(x, w, s, r, split, False)
        assert torch.allclose(fixed, ticket, rtol=1e-5, atol=1e-5), split
        assert ticket.abs().mean() > 1, split  # (rows of 512 products, not left empty)
# dense rows, y_i = x_i but for the first four, x_0 times nan, inf, 3e9 and 2e9: a part whose sum is not finite, or
# past +-2^31, makes its row NaN (the ticket's rows: nan, inf, 3e9)
x, w = torch.randn(1, 512, generator=g), torch.eye(40, 512)
x[0, 0], w[:4, :4] = 1, 0
w[:4, 0] = torch.tensor([float("nan"), float("inf"), 3e9, 2e9])
y = split_rows(x, w, None, torch.zeros(1, 40), 4, True)
assert y[0, :3].isnan().all() and y[0, 3] == 2e9 and torch.allclose(y[0, 4:], x[0, 4:40], rtol=0, atol=1e-6)
# every split-K launch above (int4 one-row products, tensor-core tiles in parts, fixed-point sums) left its tickets and
# slots as it found them
from llama_dist.kernels.gemv_triton import tickets_left
assert tickets_left() == 0
print("ok")
"""

ATTENTION_SCRIPT = """
import torch
import torch.nn.functional as F
from llama_dist.model.args import ModelArgs
from llama_dist.kernels.decode_attention import decode_attention, load
from llama_dist.model.transformer import apply_rotary, rope_table
from tests.helpers import paged, unpaged
assert load()
g = torch.Generator().manual_seed(0)
# random positions, and the first, a tile's last and the next tile's first (the interpreter's tiles hold 16), and
# rows whose positions fill two and three parts of 32 (invariant); the interpreter's GPU runs 8 programs at once, so
# batches of at most 4 rows x kv heads (and every row alone) split rows across programs (not invariant: a row's
# positions over 2 of them, or alone over up to 8), 3 rows x 2 kv heads read them whole
for bsz, n_kv, n_rep, length, d, at in ((1, 4, 1, 40, 32, None), (3, 2, 3, 70, 16, None), (2, 1, 8, 17, 64, None),
                                        (3, 2, 1, 33, 16, [0, 15, 16]), (4, 1, 2, 70, 16, [31, 32, 64, 69])):
    table = rope_table(ModelArgs(dim=d, n_heads=1, rope_theta=1000.0), length)
    qkv = torch.randn(bsz, 1, (n_rep + 2) * n_kv * d, generator=g)
    cache_k, cache_v = (torch.randn(bsz + 2, n_kv, length, d, generator=g) for _ in range(2))
    slots = torch.randperm(bsz + 2, generator=g)[:bsz]  # any cache rows
    pos = torch.randint(0, length, (bsz,), generator=g) if at is None else torch.tensor(at)
    rope = table[pos].unsqueeze(1)
    # the model's step-by-step path
    q, k, v = qkv.split([n_rep * n_kv * d, n_kv * d, n_kv * d], dim=-1)
    q = apply_rotary(q.view(bsz, 1, -1, d), rope).transpose(1, 2).reshape(bsz, n_kv, n_rep, d)
    k = apply_rotary(k.view(bsz, 1, n_kv, d), rope)
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    ref_k[slots, :, pos], ref_v[slots, :, pos] = k[:, 0], v.view(bsz, n_kv, d)
    mask = (torch.arange(length) <= pos[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, ref_k[slots], ref_v[slots], attn_mask=mask).reshape(bsz, 1, -1)
    for invariant in (False, True):
        (pages_k, table), (pages_v, _) = (paged(c, 16, torch.Generator().manual_seed(1)) for c in (cache_k, cache_v))
        out = decode_attention(qkv, rope, pages_k, pages_v, table, slots, torch.stack([pos, pos], 1)[:, 0], n_rep,
                               invariant)  # (strided positions)
        assert torch.equal(unpaged(pages_k, table, length), ref_k)  # the new key and value written
        assert torch.equal(unpaged(pages_v, table, length), ref_v)
        assert (out - ref).abs().max() < 1e-5, (bsz, n_kv, n_rep, invariant, (out - ref).abs().max())
        # alone, a row has more programs (and without invariant, in parts where the batch had one); invariant:
        # the same bits as in the batch
        for i in range(bsz):
            alone = decode_attention(qkv[i:i + 1], rope[i:i + 1], pages_k, pages_v, table, slots[i:i + 1],
                                     pos[i:i + 1], n_rep, invariant)
            assert (alone - ref[i:i + 1]).abs().max() < 1e-5, (bsz, n_kv, n_rep, invariant, i)
            assert torch.equal(alone, out[i:i + 1]) or not invariant, (bsz, n_kv, n_rep, i)
            # a window of the row's own length launches programs for its parts only; one too short, fewer still
            for window in (int(pos[i]) + 1, 1):
                short = decode_attention(qkv[i:i + 1], rope[i:i + 1], pages_k, pages_v, table, slots[i:i + 1],
                                         pos[i:i + 1], n_rep, invariant, window)
                assert (short - ref[i:i + 1]).abs().max() < 1e-5, (bsz, n_kv, n_rep, invariant, i, window)
                assert torch.equal(short, out[i:i + 1]) or not invariant, (bsz, n_kv, n_rep, i, window)
print("ok")
"""


def run_interpreted(script: str) -> None:
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_decode_attention_kernel_in_the_interpreter():
    """Rows at different positions in any cache rows, MHA and GQA groups of 3 and 8 query heads, read whole or in
    parts by several programs: the rotated key and the value land in the cache, the output equals rotary + SDPA's;
    batch-invariant, a row alone gives the same bits as in its batch."""
    run_interpreted(ATTENTION_SCRIPT)


def test_decode_attention_launch_by_rows_and_window():
    """How the CUDA kernel is launched (an H200: 264 programs of 4 warps at once; 7B's 32 kv heads): one row reads
    a short window whole, one tile in one program of 8 warps; longer, over 8 programs in tiles of 32; 8 rows or
    more fill the GPU with one program of 4 warps a row and head; batch-invariant runs always in parts of 512."""
    from llama_dist.kernels.decode_attention import launch

    assert launch(64, 32, False, 264) == (1, 64, 8)
    assert launch(4224, 32, False, 264) == (8, 32, 4)
    assert launch(96, 32, False, 264) == (3, 32, 4)
    assert launch(64, 8 * 32, False, 264) == launch(4224, 32 * 32, False, 264) == (1, 32, 4)
    assert launch(64, 32, True, 264) == (1, 32, 4) and launch(4224, 32, True, 264) == (8, 32, 4)


def test_capped_int4_tiles_fit_four_programs_an_sm_without_spilling(monkeypatch):
    """The one-row int4 tiles compiled within a register cap (maxnreg), as the H200 table's products run them (q/k/v
    with its norm the one-row tile, wo and w2 with the gate and residual the split-K ones), take at most the cap and
    spill nothing, so four programs of 4 warps fit an SM: whether Triton knows the sizes to be multiples of 16 or not
    (which changes the registers ptxas takes uncapped)."""
    import triton

    from llama_dist.kernels import gemv_triton

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from kernel_ptx import POINTERS, compile_for, one_row_constants, residency

    if "maxnreg" not in inspect.signature(triton.Config).parameters:
        pytest.skip("this Triton cannot cap a kernel's registers")
    capped = [c for c in gemv_triton._INT4_CONFIGS if c.maxnreg]
    assert len(capped) == 3  # (the 32x1024 tiles of 4 warps, one-row and in 4 parts; 64x512 in 8 parts)
    for config in capped:
        split = config.kwargs["SPLIT_K"] > 1
        constants = one_row_constants(INT4=True, NORM=not split, GATED=split, RESIDUAL=split, **config.kwargs)
        pointers = {**POINTERS, "w_ptr": "*i32"}
        for aligned in (tuple(pointers), (*pointers, "N", "K")):
            kernel = compile_for(gemv_triton._gemv_kernel, constants, {**pointers, "eps": "fp32"}, aligned=aligned,
                                 num_warps=config.num_warps, maxnreg=config.maxnreg)
            registers, programs, spilled = residency(kernel.asm["ptx"], 90, config.num_warps, kernel.metadata.shared)
            if registers is None:
                pytest.skip("no ptxas in this Triton")
            # (Triton 3.9 keeps one value of the split-K 32x1024 tile in local memory where it cannot take the sizes
            # to be multiples of 16: stored once before the loop, loaded once after it)
            allowed = 4 if split and "N" not in aligned else 0
            assert registers <= config.maxnreg and spilled <= allowed, (config, aligned, registers, spilled)
            assert programs * config.num_warps >= 16, (config, programs)


def test_one_row_kernel_loads_only_its_weights_as_first_to_leave_l2(monkeypatch):
    """The weights, read once a step, are loaded evict_first as the model launches the kernel; x, the group scales
    and the residual, which other programs and kernels read again, keep L2's default policy."""
    from llama_dist.kernels import gemv_triton

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from kernel_ptx import POINTERS, compile_for, one_row_constants

    constants = one_row_constants(INT4=True, NORM=True, RESIDUAL=True, BLOCK_N=32, BLOCK_K=1024)
    pointers = {**POINTERS, "w_ptr": "*i32"}
    ptx = compile_for(gemv_triton._gemv_kernel, constants, {**pointers, "eps": "fp32"}, aligned=tuple(pointers),
                      num_warps=4).asm["ptx"]
    loads = re.findall(r"ld\.global\S*", ptx)
    first = [op for op in loads if "evict_first" in op]
    # 32 rows x 128 words a tile, two tiles' loads in the code (before the wait and in the loop): 16-byte loads
    assert len(first) == 2 * 32 * 128 // (4 * 128) and all(op.endswith(".v4.b32") for op in first), loads
    assert len(first) < len(loads)


@pytest.mark.parametrize("fixed_point", [True, False])
def test_residual_is_read_before_the_split_k_ticket(fixed_point, monkeypatch):
    """A split-K launch reads its residual while its weights stream, not after the ticket (or the fixed-point sum) that
    names the program finishing each row (where the read would sit on the path the next kernel waits for): the
    kernel with a residual issues one more global load before its first atomic than the same kernel without, and
    none more after it."""
    from llama_dist.kernels import gemv_triton

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from kernel_ptx import POINTERS, compile_for, one_row_constants

    pointers = {**POINTERS, "w_ptr": "*i32"}

    def loads(residual: bool) -> tuple[int, int]:
        constants = one_row_constants(INT4=True, GATED=True, RESIDUAL=residual, BLOCK_N=32, BLOCK_K=1024, SPLIT_K=4,
                                      FIXED_POINT=fixed_point)
        ptx = compile_for(gemv_triton._gemv_kernel, constants, {**pointers, "eps": "fp32"}, aligned=tuple(pointers),
                          num_warps=4).asm["ptx"]
        ticket = ptx.index("atom.global")
        return len(re.findall(r"ld\.global", ptx[:ticket])), len(re.findall(r"ld\.global", ptx[ticket:]))

    (before, after), (plain_before, plain_after) = loads(True), loads(False)
    assert (before, after) == (plain_before + 1, plain_after), (before, after, plain_before, plain_after)


def test_prompt_int8_tiles_arrive_by_tma_into_wgmma_with_the_weights_in_registers(monkeypatch):
    """The int8 prompt kernel's speed rests on its form on Hopper (RESULTS.md, 42nd session): both tiles by TMA,
    the int8 tile converted in registers and given to wgmma as its register operand (x's from shared memory), no
    mma.sync; each of its tuned configs compiled for sm_90."""
    from llama_dist.kernels import quant_matmul_triton

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from kernel_ptx import compile_for

    for config in quant_matmul_triton._ROWS_CONFIGS:
        m, n, k = (config.kwargs[f"BLOCK_{d}"] for d in "MNK")
        types = {"x_desc": f"tensordesc<bf16[{m},{k}]>", "w_desc": f"tensordesc<i8[{n},{k}]>",
                 "y_desc": f"tensordesc<bf16[{m},{n}]>", "s_ptr": "*bf16"}
        ptx = compile_for(quant_matmul_triton._int8_rows_kernel, config.kwargs, types, num_warps=config.num_warps,
                          num_stages=config.num_stages).asm["ptx"]
        products = re.findall(r"wgmma\.mma_async\S*\.bf16\.bf16 \{[^}]*\}, (\S+)", ptx)
        assert products and all(a.startswith("{%r") for a in products), (config, products[:2])
        assert "mma.sync" not in ptx and "cp.async.bulk.tensor.2d" in ptx, config


@pytest.mark.parametrize("split, tile, warps", [(False, 64, 8), (True, 32, 4)])
def test_decode_attention_compiles_with_the_arguments_inductor_passes(split, tile, warps, monkeypatch):
    """Under torch.compile, inductor types the kernel's float argument (the softmax scale) as fp64: the kernel
    still compiles for sm_90 (no GPU needed: Triton's wheel carries ptxas), read whole (a GPU's short rows: one
    tile of 64 positions, 8 warps) and in parts."""
    from llama_dist.kernels import decode_attention

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from kernel_ptx import compile_for

    assert decode_attention.load()
    compiled = compile_for(decode_attention._attention_kernel,
                           {**ATTENTION_CONSTANTS, "SPLIT": split, "BLOCK_L": tile, "WHOLE": not split},
                           {**ATTENTION_POINTERS, "scale": "fp64"}, num_warps=warps)
    assert "mma" in compiled.asm["ptx"]  # (q times the keys on tensor cores)


PDL_ORDER_SCRIPT = """
import sys
import triton.language as tl
from llama_dist.kernels import gemv_triton
gemv_triton._GDC = tl.constexpr(True)  # the griddepcontrol instructions compiled in, as on sm_90 GPUs
from llama_dist.kernels import decode_attention
from tests.helpers import ATTENTION_CONSTANTS, ATTENTION_POINTERS
assert decode_attention.load()
sys.path.insert(0, "benchmarks")
from kernel_ptx import POINTERS, compile_for, one_row_constants


def wait_then_release(fn, constants, types):
    ptx = compile_for(fn, constants, types, num_warps=4).asm["ptx"]
    wait, release = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
    assert 0 <= wait < release, (fn.__name__, constants, wait, release)


base = one_row_constants(BLOCK_N=16, BLOCK_K=256)
for flags, weight in (({"INT4": True, "NORM": True}, "*i32"), ({"SCALED": True, "DP4A": True, "SPLIT_K": 4}, "*i8"),
                      ({"GATED": True, "RESIDUAL": True}, "*bf16"),
                      ({"WORLD": 2, "X_SLOTS": True, "R_SLOTS": True, "Y_SLOTS": True}, "*bf16")):
    wait_then_release(gemv_triton._gemv_kernel, {**base, **flags}, {**POINTERS, "w_ptr": weight, "eps": "fp32"})
for split in (False, True):
    wait_then_release(decode_attention._attention_kernel, {**ATTENTION_CONSTANTS, "SPLIT": split},
                      {**ATTENTION_POINTERS, "scale": "fp32"})
print("ok")
"""


def test_kernels_release_the_next_one_only_after_their_own_wait():
    """Launched as programmatic dependents, a kernel starts before the one before it has finished and reads only
    weights and earlier steps' cache until its wait. That is safe while every kernel lets the next one start only
    after its own wait (then the kernel two launches back has finished): compiled for sm_90 with the
    griddepcontrol instructions in, each one-row product's (plain, split, with peer slots) and the decode
    attention's wait comes before its release."""
    out = subprocess.run([sys.executable, "-c", PDL_ORDER_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_gemv_kernel_in_the_interpreter():
    """Dense, int8 and int4 one-row products with the norm, SwiGLU and residual folded in (int4 against the same
    arithmetic with 8-bit activations, exactly, and against the dequantized product, closely); int8 and int4
    products of several rows on tensor cores; their split-K launches leave no ticket set."""
    run_interpreted(SCRIPT)


PEER_SCRIPT = """
import torch
import torch.nn.functional as F
from llama_dist.distributed.peer_memory import PeerSlots, PeerSum
from llama_dist.kernels.gemv import gemv, load, peer_sum
from llama_dist.quant.weights import int8_quantize
assert load()
g = torch.Generator().manual_seed(0)
world, dim, hidden = 2, 96, 80  # dim is not a multiple of the interpreter's 64-wide tile
# every rank's slots in this one process: the address table is what the ranks exchange on GPUs
slots = [torch.full((2, world, dim), float("nan")) for _ in range(world)]
counters = [torch.zeros(2, dtype=torch.int32) for _ in range(world)]
peers = torch.tensor([(s.data_ptr(), c.data_ptr()) for s, c in zip(slots, counters)])
ranks = [PeerSlots(r, world, slots[r], counters[r], torch.zeros(2, dtype=torch.int32), peers,
                   torch.zeros(1, dtype=torch.int32)) for r in range(world)]
wo = [torch.randn(dim, 64, generator=g) for _ in range(world)]  # row-parallel: each rank's input columns
w13 = [torch.randn(2 * hidden, dim, generator=g) for _ in range(world)]  # column-parallel: its output rows
w2 = [int8_quantize(torch.randn(dim, hidden, generator=g)) for _ in range(world)]
norm_weight = torch.rand(dim, generator=g) + 0.5
for step in range(1, 4):  # counters keep growing; each step's sums are its own
    x = torch.randn(1, 1, dim, generator=g)
    attended = [torch.randn(1, 1, 64, generator=g) for _ in range(world)]
    for peer in ranks:
        peer.next_step()
    h, out = PeerSum(ranks[0], 0), PeerSum(ranks[0], 1)
    for r, peer in enumerate(ranks):  # the attention output's projection, rank 0 adding the residual
        gemv(attended[r], wo[r], residual=x if r == 0 else None, into=PeerSum(peer, 0))
    assert all(c.tolist() == [step * world, (step - 1) * world] for c in counters)  # every rank's signal
    want_h = x + sum(a @ w.t() for a, w in zip(attended, wo))
    normed = F.rms_norm(want_h, (dim,), norm_weight, 1e-5)
    gate_up = [gemv(PeerSum(peer, 0), w13[r], norm_weight=norm_weight, eps=1e-5) for r, peer in enumerate(ranks)]
    for r in range(world):
        want = normed @ w13[r].t()
        assert (gate_up[r] - want).abs().max() < 1e-4 * want.abs().max(), (step, r)
    for r, peer in enumerate(ranks):  # the feed-forward's output, rank 0 adding h straight from the slots
        q, s = w2[r]
        gemv(gate_up[r], q, s, gated=True, residual=PeerSum(peer, 0) if r == 0 else None, into=PeerSum(peer, 1))
    want = want_h + sum(F.silu(gu[..., :hidden]) * gu[..., hidden:] @ (q.float() * s[:, None]).t()
                        for gu, (q, s) in zip(gate_up, w2))
    for peer in ranks:
        got = peer_sum(PeerSum(peer, 1))
        assert got.shape == (1, 1, dim) and (got - want).abs().max() < 1e-4 * want.abs().max(), step
    assert all(c.tolist() == [step * world] * 2 for c in counters)
    assert all(p.arrivals.tolist() == [0, 0] for p in ranks)
# int4 (its inputs split over two programs per block of rows: the last of them finishes the rows and writes the
# slots), against the same arithmetic with the input in int8 per group of 32
from llama_dist.quant.weights import int4_dequantize, int4_quantize, int4_words
x = torch.randn(1, 1, dim, generator=g)
attended = [torch.randn(1, 1, 128, generator=g) for _ in range(world)]
quantized = [int4_quantize(torch.randn(dim, 128, generator=g), 32) for _ in range(world)]
for peer in ranks:
    peer.next_step()
for r, (peer, (q, scales, zeros)) in enumerate(zip(ranks, quantized)):
    sz = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
    gemv(attended[r], int4_words(q), sz, residual=x if r == 0 else None, into=PeerSum(peer, 0))
groups = [a.reshape(-1, 32) for a in attended]
rounded = [(torch.floor(a / (a.abs().amax(-1, keepdim=True) / 127) + 0.5) * a.abs().amax(-1, keepdim=True) / 127)
           for a in groups]
want = x + sum(a.reshape(1, 1, -1) @ int4_dequantize(*qsz).t() for a, qsz in zip(rounded, quantized))
for peer in ranks:
    got = peer_sum(PeerSum(peer, 0))
    assert (got - want).abs().max() < 1e-4 * want.abs().max(), (got - want).abs().max()
assert all(p.arrivals.tolist() == [0, 0] for p in ranks)
print("ok")
"""


def test_kernels_sum_partial_products_through_peer_slots():
    """Two ranks' partial products summed by the kernels that read them (peer_memory.py's protocol), in one
    process: each rank's product lands in every rank's slots and is counted there; the next kernels read the
    sum as their (normalised) input or residual; three steps through the same slots."""
    run_interpreted(PEER_SCRIPT)


PACKED_SCRIPT = """
import torch
import torch.nn.functional as F
from llama_dist.kernels.packed_attention import BLOCK_M, load, packed_attention
from tests.helpers import paged
assert load()
g = torch.Generator().manual_seed(0)
runs = [(1, 0, 2 * BLOCK_M + 3), (0, 5, 3), (2, 10, 1), (1, 2 * BLOCK_M + 3, 17)]  # (cache row, start, tokens)
rows = torch.tensor([r for r, s, n in runs for _ in range(n)])
pos = torch.tensor([p for r, s, n in runs for p in range(s, s + n)])
for n_heads, n_kv, d in ((4, 2, 16), (3, 1, 32), (2, 2, 16)):
    cache_k, cache_v = (torch.randn(3, n_kv, 100, d, generator=g) for _ in range(2))
    (pages_k, table), (pages_v, _) = (paged(c, 16, torch.Generator().manual_seed(1)) for c in (cache_k, cache_v))
    q = torch.randn(len(rows), n_heads, d, generator=g)
    got = packed_attention(q, pages_k, pages_v, table, rows, pos, torch.tensor([n for *_, n in runs]))
    for t in range(len(rows)):  # each token over its row's positions up to its own
        k, v = (c[rows[t], :, :pos[t] + 1].repeat_interleave(n_heads // n_kv, 0) for c in (cache_k, cache_v))
        want = F.scaled_dot_product_attention(q[t][:, None], k, v).reshape(-1)
        assert (got[t] - want).abs().max() < 1e-5, (n_heads, n_kv, t)
print("ok")
"""


def test_packed_attention_kernel_in_the_interpreter():
    """Packed prompt runs (several blocks of one run, runs in other cache rows, from positions past 0, a run of
    one token, GQA) attend as each token alone over its row's positions up to its own."""
    run_interpreted(PACKED_SCRIPT)


INVARIANT_SCRIPT = """
import numpy as np
import torch
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
# The interpreter's tl.dot is numpy's matmul, whose OpenBLAS (0.3.31, numpy 2.4.6) sums a row differently by its
# place in the tile, which a GPU's tensor cores do not; einsum sums every output in one order wherever it sits,
# so the check below is of the kernels' tiling and masks, as on a GPU.
assert hasattr(InterpreterBuilder, "create_dot"), "Triton's interpreter changed: see how tl.dot is run"
InterpreterBuilder.create_dot = lambda self, a, b, d, *precision: TensorHandle(
    np.einsum("ik,kj->ij", a.data, b.data).astype(d.data.dtype) + d.data, d.dtype.scalar)
from llama_dist.checkpoint.config import LoadConfig
from llama_dist.checkpoint.loader import load_model
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.distributed.context import init_distributed
from llama_dist.kernels import Kernels, install, invariant
from llama_dist.model.args import ModelArgs
from llama_dist.model.transformer import Packed
from llama_dist.quant.weights import Int8Weight
from tests.helpers import TINY_GQA, random_state_dict
args = ModelArgs(**TINY_GQA)
ctx = init_distributed(backend="gloo")
tokens = torch.tensor([[5, 17, 99, 3, 250], [1, 2, 3, 4, 5], [300, 8, 8, 8, 41]])
state = random_state_dict(args)
config = LoadConfig(dtype="float32", quantize="none", n_ctx=64, max_batch_size=3)
kernels = Kernels("triton", row_kernels=True, batch_invariant=True)


def model(kernels=kernels):
    return install(load_model(StateDictSource(args, state), ctx, config, progress=False), kernels)


plain, batched = model(Kernels("sdpa")), model()
assert type(batched.norm) is invariant.RowKernelRMSNorm
assert {type(m).__name__ for m in batched.modules() if "Linear" in type(m).__name__} == {
    "InvariantColumnParallelLinear", "InvariantRowParallelLinear"}
steps = [batched(tokens[:, i:i + 1], i) for i in range(tokens.shape[1])]  # three rows decoding together
want = torch.cat([plain(tokens[:, i:i + 1], i) for i in range(tokens.shape[1])], dim=1)
assert (torch.cat(steps, dim=1) - want).abs().max() < 1e-5 * want.abs().max()
for j in range(3):  # each row alone, in a model of its own (cache row 0): the very same logits
    alone = model()
    for i in range(tokens.shape[1]):
        assert torch.equal(alone(tokens[j:j + 1, i:i + 1], i), steps[i][j:j + 1]), (j, i)
# past the decode attention's first part (the interpreter's hold 32 positions), where a row alone is read by more
# programs than in the batch: the same bits
prompts = torch.randint(0, args.vocab_size, (3, 37), generator=torch.Generator().manual_seed(2))
together = model()
together(prompts[:, :36].reshape(1, -1), 0, Packed.of((0, 1, 2), (0, 0, 0), (36, 36, 36), "cpu"), last_only=True)
step = together(prompts[:, 36:], 36)
for j in range(3):
    alone = model()
    alone(prompts[j:j + 1, :36], 0, Packed.of((0,), (0,), (36,), "cpu"), last_only=True)
    assert torch.equal(alone(prompts[j:j + 1, 36:], 36), step[j:j + 1]), j
# prompts packed side by side against each alone: each run's last logits, bit for bit
both = model()(tokens.reshape(1, -1), 0, Packed.of((0, 1, 2), (0, 0, 0), (5, 5, 5), "cpu"), last_only=True)
for j in range(3):
    alone = model()(tokens[j:j + 1], 0, Packed.of((0,), (0,), (5,), "cpu"), last_only=True)
    assert torch.equal(alone[0, -1], both[0, j]), j
# a prompt read in one pass, or its first block's 16 tokens first (a prefix from the cache) and the rest after:
# the same last logits, so GPUs may reuse cached prefixes block by block (serving/kv_blocks.py)
prompt = torch.randint(0, args.vocab_size, (1, 21), generator=torch.Generator().manual_seed(1))
whole = model()(prompt, 0, Packed.of((0,), (0,), (21,), "cpu"), last_only=True)
parts = model()
parts(prompt[:, :16], 0, Packed.of((0,), (0,), (16,), "cpu"), last_only=True)
assert torch.equal(parts(prompt[:, 16:], 0, Packed.of((0,), (16,), (5,), "cpu"), last_only=True), whole)
# quantized weights sum by batch size in their kernels: refused
quantized = load_model(StateDictSource(args, state), ctx, config, progress=False)
quantized.output.set_quantized(Int8Weight.quantize(quantized.output.weight.data, torch.float32))
try:
    install(quantized, kernels)
    raise AssertionError("installed over int8 weights")
except ValueError as e:
    assert "dense weights" in str(e)
# the product alone: rows past a tile, rows anywhere in a tile, against the same rows in any other batch
g = torch.Generator().manual_seed(0)
for n, k in ((40, 288), (130, 64), (7, 100)):
    w = torch.randn(n, k, generator=g)
    x = torch.randn(70, k, generator=g)  # more rows than a tile
    full = invariant.linear(x, w)
    assert full.shape == (70, n)
    assert (full - x @ w.t()).abs().max() < 1e-5 * (x @ w.t()).abs().max(), (n, k)
    for rows in (slice(0, 1), slice(3, 4), slice(5, 9), slice(60, 70), slice(1, 66)):
        assert torch.equal(invariant.linear(x[rows], w), full[rows]), (n, k, rows)
print("ok")
"""


def test_batch_invariant_kernels_in_the_interpreter():
    """With the batch-invariant kernels a row's logits are the same bits whether it decodes alone or beside
    others, and a prompt's whether it is packed alone or with others (plain F.linear fails this on CPUs too) or
    read in two passes, and close to the plain model's; the fixed-tile product of any rows equals the same rows'
    in any batch."""
    run_interpreted(INVARIANT_SCRIPT)


MODEL_SCRIPT = """
import torch
from llama_dist.checkpoint.config import LoadConfig
from llama_dist.checkpoint.loader import load_model
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.distributed.context import init_distributed
from llama_dist.kernels import Kernels, install
from llama_dist.kernels.fused import FusedTransformerBlock
from llama_dist.model.args import ModelArgs
from llama_dist.model.transformer import Packed, TransformerBlock
from tests.helpers import TINY_GQA, random_state_dict
args = ModelArgs(**TINY_GQA)
ctx = init_distributed(backend="gloo")
tokens = torch.tensor([[5, 17, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6], [300, 8, 8, 8, 41, 0]])
state = random_state_dict(args)
# int8: the plain path rounds activations to the scales' dtype (bf16) first, the kernel sums in fp32, and for one
# row takes x rounded to int8 per group of 32 (that arithmetic exactly: the gemv test)
for quantize, tolerance in (("none", 1e-5), ("int8", 3e-2)):
    config = LoadConfig(dtype="float32", quantize=quantize, n_ctx=16, max_batch_size=3)
    plain = load_model(StateDictSource(args, state), ctx, config, progress=False)
    for kernels in (Kernels("triton", gemv=True, row_kernels=True), Kernels("triton"), Kernels("sdpa", gemv=True),
                    Kernels("sdpa", row_kernels=True)):
        fused = install(load_model(StateDictSource(args, state), ctx, config, progress=False), kernels)
        assert all(type(b) is FusedTransformerBlock for b in fused.layers.values())
        assert all(type(b) is TransformerBlock for b in plain.layers.values())
        assert fused.state_dict().keys() == plain.state_dict().keys()
        for rows in (tokens[:1], tokens):  # one row (the matmul kernel too), three (the attention kernel)
            logits = {}
            for name, model in (("fused", fused), ("plain", plain)):  # one token per row at a time
                logits[name] = torch.cat([model(rows[:, i:i + 1], i) for i in range(rows.shape[1])], dim=1)
            err = (logits["fused"] - logits["plain"]).abs().max() / logits["plain"].abs().max()
            assert err < tolerance, (quantize, kernels, len(rows), err)
        # prompts take the plain block: the same logits for a whole prompt, and for prompts packed side by side
        assert (fused(tokens, 0) - plain(tokens, 0)).abs().max() / plain(tokens, 0).abs().max() < tolerance
        packed = Packed.of((2, 0), (0, 0), (4, 6), "cpu")
        both = torch.cat([tokens[1:2, :4], tokens[2:3]], dim=1)
        want = plain(both, 0, packed, last_only=True)
        assert (fused(both, 0, packed, last_only=True) - want).abs().max() / want.abs().max() < tolerance
print("ok")
"""


def test_model_decodes_the_same_through_the_kernel():
    """The model with the fused backend installed (for one row every projection through the one-row kernel, with
    norms, SwiGLU and residuals folded in; for one and three rows the attention kernel; for three rows the norms
    and SwiGLU as row kernels; each kernel alone too) decodes to the plain model's logits, dense and int8, and
    prompts to the same logits."""
    run_interpreted(MODEL_SCRIPT)


QUANTIZED_MODEL_SCRIPT = """
import torch
from llama_dist.checkpoint.config import LoadConfig
from llama_dist.checkpoint.loader import load_model
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.distributed.context import init_distributed
from llama_dist.kernels import Kernels, install
from llama_dist.kernels.quant_matmul import DOT_ROWS, TritonInt8Weight
from llama_dist.model.args import ModelArgs
from llama_dist.parallel.layers import ShardedWeight
from llama_dist.quant.weights import Int8Weight
from tests.helpers import TINY_GQA, random_state_dict
args = ModelArgs(**TINY_GQA)
ctx = init_distributed(backend="gloo")
tokens = torch.tensor([[5, 17, 99, 3], [1, 2, 3, 4], [300, 8, 8, 41]])
prompt = torch.randint(0, args.vocab_size, (1, DOT_ROWS + 6), generator=torch.Generator().manual_seed(0))
state = random_state_dict(args)
config = LoadConfig(dtype="float32", quantize="none", n_ctx=80, max_batch_size=3)


def quantized():
    # every projection int8 with fp32 activations (the interpreter's dot does not take bf16)
    model = load_model(StateDictSource(args, state), ctx, config, progress=False)
    for name, layer in model.named_modules():
        if isinstance(layer, ShardedWeight) and name != "tok_embeddings":
            layer.set_quantized(Int8Weight.quantize(layer.weight.data, torch.float32))
    return model


plain = quantized()
for kernels in (Kernels("triton", gemv=True, row_kernels=True, quantized=True), Kernels("sdpa", quantized=True)):
    fused = install(quantized(), kernels)
    assert {type(m.qweight) for m in fused.modules() if getattr(m, "qweight", None) is not None} == {TritonInt8Weight}
    for rows in (tokens[:1], tokens):  # one row (the one-row kernel, with or without folds), three (tensor cores)
        logits = {}
        for name, model in (("fused", fused), ("plain", plain)):
            logits[name] = torch.cat([model(rows[:, i:i + 1], i) for i in range(rows.shape[1])], dim=1)
        err = (logits["fused"] - logits["plain"]).abs().max() / logits["plain"].abs().max()
        # one row meets x rounded to int8 per group of 32 in the kernel (exactly so: the gemv test), several do not
        assert err < (2e-2 if len(rows) == 1 else 1e-5), (kernels, len(rows), err)
    want = plain(prompt, 0)  # more rows than the tensor-core kernel takes: the dequantized matrix's product
    assert (fused(prompt, 0) - want).abs().max() < 1e-5 * want.abs().max(), kernels
print("ok")
"""


def test_quantized_model_through_the_kernels():
    """A model whose projections are int8 decodes (one and three rows) and reads a prompt through the installed
    kernels to the logits of the same weights' plain modules."""
    run_interpreted(QUANTIZED_MODEL_SCRIPT)


GRAPHED_SCRIPT = """
import torch
from llama_dist.checkpoint.config import LoadConfig
from llama_dist.checkpoint.loader import load_model
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.distributed.context import init_distributed
from llama_dist.kernels import Kernels, install
from llama_dist.model.args import ModelArgs
from llama_dist.model.transformer import Packed, run_ends
from llama_dist.runner.graphs import GraphedPrompts, GraphedStep, rerun
from tests.helpers import TINY_GQA, random_state_dict
args = ModelArgs(**TINY_GQA)
ctx = init_distributed(backend="gloo")
config = LoadConfig(dtype="float32", quantize="none", n_ctx=600, max_batch_size=3)
state = random_state_dict(args)
plain = load_model(StateDictSource(args, state), ctx, config, progress=False)
fused = install(load_model(StateDictSource(args, state), ctx, config, progress=False),
                Kernels("triton", gemv=True, row_kernels=True))
step = GraphedStep(fused, record=rerun)
# the attention kernel reads each row up to its position: per bucket a graph for rows it reads whole (the
# interpreter's 32 positions: one tile, one program a row and kv head) and one for longer rows, shared over programs
assert step.windows == [32, 600]
prompt = torch.randint(0, args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
for model in (plain, fused):
    model(prompt, 0)
tokens = prompt[:, -1:]
for pos in range(30, 36):  # two steps in the short window, four past it (two parts a row, merged)
    want = plain(tokens, pos, last_only=True)
    got = step(tokens, pos)
    assert (got - want).abs().max() < 1e-4 * want.abs().max(), (pos, (got - want).abs().max())
    tokens = want[:, -1].argmax(-1, keepdim=True)
# what a one-row step launches (views launch nothing): the embedding and rotary lookups, each layer's four products
# and attention, and the output product with the final norm folded in; no attention mask, no norm of its own
from torch.utils._python_dispatch import TorchDispatchMode
class Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func).removesuffix(".default"))
        return func(*args, **(kwargs or {}))
with Launches() as launches:
    fused(tokens[:1], torch.tensor([8]), torch.tensor([0]), length=600, last_only=True)
layer = ["llama_dist.gemv", "llama_dist.decode_attention", "llama_dist.gemv", "llama_dist.gemv", "llama_dist.gemv"]
assert launches.ops == ["aten.embedding", "aten.index.Tensor", *layer * args.n_layers, "llama_dist.gemv"], launches.ops
# prompt passes: any packing replayed from the graph of its token bucket, as the model's own pass computes it
config = LoadConfig(dtype="float32", quantize="none", n_ctx=64, max_batch_size=3)
plain = load_model(StateDictSource(args, state), ctx, config, progress=False)
fused = install(load_model(StateDictSource(args, state), ctx, config, progress=False),
                Kernels("triton", gemv=True, row_kernels=True))
prompts = GraphedPrompts(fused, record=rerun)
assert prompts.buckets == [16, 32, 64, 128, 192]
for chunks in ([(0, 0, list(range(1, 13))), (2, 0, list(range(20, 31)))],  # (slot, start, ids)
               [(0, 12, [4, 5]), (1, 0, [9] * 20), (1, 20, [3] * 5), (2, 11, [8])],  # row 1: one run of two
               [(2, 0, [7] * 40)]):
    slots, starts, ids = zip(*chunks)
    lengths = tuple(map(len, ids))
    assert prompts.holds(sum(lengths), len(run_ends(slots, starts, lengths)))
    flat = torch.tensor([[t for part in ids for t in part]])
    want = plain(flat, 0, Packed.of(slots, starts, lengths, "cpu"), last_only=True)[0]
    got = prompts(slots, starts, list(ids))
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4 * want.abs().max(), chunks
    for a, b in zip(plain.layers.values(), fused.layers.values()):  # what the runs wrote to their rows
        for slot, start, part in chunks:
            row, end = torch.tensor([slot]), start + len(part)
            assert torch.allclose(a.attention.cached(row, end)[0][..., start:, :],
                                  b.attention.cached(row, end)[0][..., start:, :], atol=1e-5)
# tokens given as -1 are each their row's token chosen on the device (the engine's overlap), resolved after the copy
chosen = torch.tensor([44, 0, 55])
slots, starts, ids = (0, 1, 2), (14, 25, 40), [[-1], [6, 6], [-1]]
want = plain(torch.tensor([[44, 6, 6, 55]]), 0, Packed.of(slots, starts, (1, 2, 1), "cpu"), last_only=True)[0]
got = prompts(slots, starts, ids, lambda tokens, rows: torch.where(tokens < 0, chosen[rows], tokens))
assert (got - want).abs().max() < 1e-4 * want.abs().max()
assert not prompts.holds(4, len(run_ends((0, 1, 0, 1), (0, 0, 1, 1), (1, 1, 1, 1))))  # 4 runs > the cache's rows
assert not prompts.holds(193, 1)  # more tokens than the largest bucket
print("ok")
"""


def test_graphed_step_with_the_kernels_installed():
    """Replayed steps (runner/graphs.py, recorded by re-running on CPUs) through the Triton kernels give the plain
    model's logits; the attention kernel needs no window, so two graphs per batch bucket (rows of one part of its
    split, and longer ones; both checked), and a step builds no mask
    (one row: its kernels and two lookups, nothing else). Packed prompt passes
    replayed from their token bucket's graph (padded tokens and runs) give the plain model's packed pass."""
    run_interpreted(GRAPHED_SCRIPT)


ROWS_SCRIPT = """
import torch
import torch.nn.functional as F
from llama_dist.kernels.rows import load, rms_norm, silu_mul
from llama_dist.model.transformer import RMSNorm
assert load()
g = torch.Generator().manual_seed(0)
for rows, k, dtype in ((3, 100, torch.float32), (1, 64, torch.float32), (5, 130, torch.float16)):
    x = (3 * torch.randn(2, rows, k, generator=g)).to(dtype)  # [..., K]: leading dimensions kept
    norm = RMSNorm(k, 1e-5, dtype=dtype)
    norm.weight.copy_(torch.rand(k, generator=g) + 0.5)
    want = norm(x)
    got = rms_norm(x, norm.weight, norm.eps)
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.float() - want.float()).abs().max() <= 2e-3 * want.float().abs().max(), (rows, k, dtype)
    gate_up = torch.randn(2, rows, 2 * k, generator=g).to(dtype)
    want = F.silu(gate_up[..., :k]) * gate_up[..., k:]
    got = silu_mul(gate_up)
    assert got.shape == want.shape and (got.float() - want.float()).abs().max() <= 2e-3 * want.float().abs().max()
    # the ops compiled code calls launch the same kernels
    assert torch.equal(torch.ops.llama_dist.silu_mul_rows(gate_up.reshape(-1, 2 * k)), got.reshape(-1, k))
    flat = x.reshape(-1, k)
    assert torch.equal(torch.ops.llama_dist.rms_norm_rows(flat, norm.weight, norm.eps),
                       rms_norm(flat, norm.weight, norm.eps))
from llama_dist.kernels.rows import rope_and_cache
from llama_dist.model.args import ModelArgs
from llama_dist.model.transformer import apply_rotary, rope_table
from tests.helpers import paged, unpaged
for bsz, seqlen, nh, nkv, d in ((1, 5, 4, 2, 16), (2, 3, 3, 1, 32)):  # GQA groups of 2 and 3
    table = rope_table(ModelArgs(dim=d, n_heads=1), 40)
    qkv = torch.randn(bsz, seqlen, (nh + 2 * nkv) * d, generator=g)
    rows = torch.tensor([[3] * seqlen, [0] * seqlen][:bsz])
    pos = torch.randint(0, 40, (bsz, seqlen), generator=g)
    (pages_k, blocks), (pages_v, _) = (paged(torch.zeros(4, nkv, 40, d), 16, torch.Generator().manual_seed(1))
                                       for _ in range(2))
    q = rope_and_cache(qkv, table[pos], pages_k, pages_v, blocks, rows, pos, nh)
    cache_k, cache_v = unpaged(pages_k, blocks, 40), unpaged(pages_v, blocks, 40)
    wq, wk, wv = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    assert (q - apply_rotary(wq.view(bsz, seqlen, nh, d), table[pos])).abs().max() < 1e-5
    want_k = apply_rotary(wk.view(bsz, seqlen, nkv, d), table[pos])
    assert (cache_k[rows, :, pos] - want_k).abs().max() < 1e-5
    assert torch.equal(cache_v[rows, :, pos], wv.view(bsz, seqlen, nkv, d))
    by_op = torch.ops.llama_dist.rope_cache_rows(qkv.reshape(bsz * seqlen, -1), table[pos].reshape(bsz * seqlen, -1),
                                                 pages_k, pages_v, blocks, rows.reshape(-1), pos.reshape(-1), nh)
    assert torch.equal(by_op, q.reshape(bsz * seqlen, -1))
print("ok")
"""


def test_row_kernels_in_the_interpreter():
    """RMSNorm and SwiGLU of several rows, one kernel each, against the model's modules (fp32 and fp16; widths
    that are not a power of two); the rotary embedding with the cache write against apply_rotary and indexing
    (GQA, tokens at any rows and positions)."""
    run_interpreted(ROWS_SCRIPT)
