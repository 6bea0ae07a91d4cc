"""The C++ CPU block matmuls (Q4_1 and Q8_0 weights, 8-bit activations) against exact reference math."""
import json
import os
import subprocess
import sys

import pytest
import torch

from llama_dist.quant.ggml import as_q4_1_rows, int4_groups_rows
from llama_dist import csrc
from llama_dist.quant.weights import Int4Weight, Q8BlockWeight, int4_dequantize, int4_quantize, q4_1_rows, q8_0_blocks
from .helpers import paged, unpaged

pytestmark = pytest.mark.skipif(not csrc.available(), reason="no C++ compiler to build the CPU kernels")


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation blocks, step by step in float32: d = amax / 127, q = round-half-even(x * (1/d))."""
    b = x.float().reshape(x.shape[0], -1, 32)
    d = b.abs().amax(dim=-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(b * inv[..., None]), d


def reference(x: torch.Tensor, w_blocks: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """sum over blocks of d_w * d_x * (q_w . q_x) + m_w * d_x * sum(q_x), in float64."""
    qx, dx = (t.double() for t in quantize_activations(x))
    dots = torch.einsum("mbk,nbk->mnb", qx, w_blocks.double())
    sums = qx.sum(-1)  # [M, blocks]
    return (dots * dx[:, None] * scales.double()[None] + sums[:, None] * dx[:, None] * mins.double()[None]).sum(-1)


def layers(k: int = 96, n: int = 37):  # 37 rows: the last Q4_1 row group is padded
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    q, scales, zeros = int4_quantize(w, 32)
    q4 = Int4Weight(q, scales, zeros, 32, torch.bfloat16)
    d4, m4 = scales.half().float(), (zeros - 8 * scales).half().float()  # as the blocks store them
    q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s8 = torch.rand(n, k // 32, generator=g) * 0.01
    q8w = Q8BlockWeight(q8_0_blocks(q8, s8))
    # Q4_0 blocks as GGUF stores them: fp16 d, then byte i holds input i (low nibble) and 16 + i (high)
    q0 = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d0 = (torch.rand(n, k // 32, generator=g) * 0.01).half()
    nibbles = q0.view(n, -1, 2, 16)
    rows0 = torch.cat([d0.view(torch.uint8).view(n, -1, 2), nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)], dim=-1)
    q4_0 = Int4Weight.from_gguf(rows0.reshape(n, -1), "Q4_0", torch.float32)
    return {"q4_1": (q4, q.float().reshape(n, -1, 32), d4, m4, int4_dequantize(q, scales, zeros)),
            "q4_0": (q4_0, q0.float().reshape(n, -1, 32), d0.float(), -8 * d0.float(),
                     (q0.float() - 8) * d0.float().repeat_interleave(32, dim=1)),
            "q8_0": (q8w, q8.float().reshape(n, -1, 32), s8.half().float(), torch.zeros_like(s8),
                     q8.float() * s8.half().float().repeat_interleave(32, dim=1))}


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
@pytest.mark.parametrize("rows", [1, 4, 7, 9])  # one row, the 4-row tile, a tile plus a remainder, 8 + 1
def test_block_matmul_equals_its_integer_math(kind, rows):
    """3 blocks per row (an odd count: the unrolled loop's remainder); float32 accumulation only."""
    layer, qw, scales, mins, dense = layers()[kind]
    assert layer.uses_blocks if kind != "q8_0" else True
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    got = layer(x)
    expected = reference(x, qw, scales, mins)
    assert got.dtype == x.dtype and got.shape == (rows, 37)
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # and 8-bit activations stay close to the dequantized fp32 product
    assert (got - x @ dense.t()).abs().max() / (x @ dense.t()).abs().max() < 2e-2


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
def test_folds_compute_the_norm_swiglu_and_residual_of_the_model(kind):
    """A decode step's RMSNorm before, SwiGLU before and residual after a product, folded into the op, against
    the model's own modules and the integer reference (rows of any leading shape, results in x's dtype)."""
    from llama_dist.model.transformer import RMSNorm

    layer, qw, scales, mins, _ = layers()[kind]
    g = torch.Generator().manual_seed(1)
    x, residual = torch.randn(2, 3, 96, generator=g), torch.randn(2, 3, 37, generator=g)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.rand(96, generator=g) + 0.5

    def close(got, x_in, plus=0.0):
        expected = reference(x_in.reshape(-1, 96), qw, scales, mins).reshape(got.shape) + plus
        return ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-4

    normed = layer.folded(x, norm.weight, norm.eps)
    assert normed.shape == (2, 3, 37) and close(normed, norm(x))
    gate_up = torch.randn(2, 3, 192, generator=g)
    assert close(layer.folded(gate_up, gated=True), torch.nn.functional.silu(gate_up[..., :96]) * gate_up[..., 96:])
    added = layer.folded(x, residual=residual)
    assert torch.equal(added, layer(x) + residual)
    assert layer.folded(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="the residual must hold 6 rows of 37"):
        layer.folded(x, residual=residual[:1])


def test_rows_of_a_q8_0_embedding_are_its_dequantized_rows():
    layer, _, _, _, dense = layers()["q8_0"]
    ids = torch.tensor([[3, 0, 36]])
    assert torch.equal(layer.rows(ids), dense[ids])


@pytest.mark.parametrize("build", ["scalar", "avx2"])
def test_other_builds_equal_this_machines_build(tmp_path, build):
    """The scalar C++ path (CPUs without AVX2, e.g. ARM Macs) and the AVX2 one (where this machine builds AVX-512
    VNNI) are built and run in a child process: 9 rows, so tiles of 4 and of 8 rows both have a remainder; and
    the decode attention (the AVX2 one against the element-by-element one)."""
    script = (
        "import json, sys, torch\n"
        "from tests.test_cpu_kernels import attention_at_40, layers\n"
        "x = torch.randn(9, 96, generator=torch.Generator().manual_seed(5))\n"
        "out = {k: v[0](x).tolist() for k, v in layers().items()}\n"
        "out['attention'] = attention_at_40().tolist()\n"
        "json.dump(out, open(sys.argv[1], 'w'))\n")
    out = tmp_path / f"{build}.json"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                   env={**os.environ, "LLAMA_DIST_CPU_KERNELS": build}, timeout=600)
    other = json.loads(out.read_text())
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(5))
    for kind, (layer, *_) in layers().items():
        here = layer(x)
        assert (torch.tensor(other[kind]) - here).abs().max() / here.abs().max() < 1e-5, kind
    assert (torch.tensor(other["attention"]) - attention_at_40()).abs().max() < 1e-5


def test_a_killed_builds_lock_does_not_hold_up_the_next(tmp_path, monkeypatch):
    """torch's extension builder waits forever on the lock file of a build that was killed; ours clears it while
    holding an OS lock of its own (which a dead process cannot keep), then builds."""
    from torch.utils import cpp_extension

    (tmp_path / "lock").write_text("")  # what a killed build leaves
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append((tmp_path / "lock").exists()))
    assert csrc._build("llama_dist_cpu_test", [], tmp_path) and seen == [False]


def attention_at_40() -> torch.Tensor:
    """The decode attention of one row at position 40 (8 kv heads of 64, 4 query heads each)."""
    g = torch.Generator().manual_seed(4)
    qkv, rope = torch.randn(1, 48 * 64, generator=g), torch.randn(1, 32, 2, generator=g)
    cache_k, cache_v = (torch.randn(3, 8, 16, 64, generator=g) for _ in range(2))  # blocks 0, 1, 2 of row 0
    return torch.ops.llama_dist.cpu_decode_attention(qkv, rope, cache_k, cache_v, torch.tensor([[0, 1, 2]]),
                                                     torch.tensor([0]), torch.tensor([40]), 4)


def test_gguf_q4_1_rows_become_row_groups_by_moving_bytes():
    """The load path from a GGUF's Q4_1 bytes (reordered as they are) equals the path through unpacked int4
    groups, and both equal the original weights' groups."""
    layer, *_ = layers()["q4_1"]
    g = torch.Generator().manual_seed(1)
    q, scales, zeros = int4_quantize(torch.randn(37, 96, generator=g), 32)
    rows = q4_1_rows(q, scales, zeros)
    assert rows.shape == (37, 3 * 20)
    uq, us, uz = int4_groups_rows(rows)  # llama.cpp's meaning of the bytes: value = d * q + m
    assert torch.equal(uq.to(q.dtype), q)
    direct = Int4Weight.from_gguf(rows, "Q4_1", torch.float32)
    unpacked = Int4Weight(uq, us, uz, 32, torch.float32)
    assert direct.uses_blocks and (direct.out_features, direct.in_features) == (37, 96)
    assert torch.equal(direct.blocks, unpacked.blocks)
    x = torch.randn(3, 96, generator=g)
    assert torch.equal(direct(x), unpacked(x))


def test_q4_0_row_groups_compute_what_their_q4_1_form_computes():
    """GGUF Q4_0 stays 18 bytes per block in its row groups (no mins: m = -8 d in the kernel); its products are
    those of the same blocks as Q4_1 (m stored), bit for bit, for one row, tiles of rows and with folds."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 256, (37, 3 * 18), generator=g, dtype=torch.uint8)
    rows.view(37, 3, 18)[..., :2] = (torch.rand(37, 3, 1, generator=g) * 0.01).half().view(torch.uint8)
    q4_0 = Int4Weight.from_gguf(rows, "Q4_0", torch.float32)
    q4_1 = Int4Weight.from_gguf(as_q4_1_rows(rows, "Q4_0"), "Q4_1", torch.float32)
    assert (q4_0.block_format, q4_0.blocks.numel(), q4_1.blocks.numel()) == ("q4_0", 3 * 3 * 288, 3 * 3 * 320)
    for n in (1, 9):
        x = torch.randn(n, 96, generator=g)
        assert torch.equal(q4_0(x), q4_1(x))
        assert torch.equal(q4_0.folded(x, gated=False, residual=torch.ones(n, 37)), q4_1(x) + 1)


@pytest.mark.parametrize("head_dim", [16, 64])
def test_decode_attention_writes_the_cache_and_attends_over_the_rows_positions(head_dim):
    """The C++ decode attention against float64 math: rows at positions 37 (groups of 8 positions and a
    remainder) and 8, in cache rows 1 and 0 of a paged cache (blocks of 16 in shuffled order), three query heads
    per kv head. The new key is rotated (Meta's interleaved pairs) and written with the value at the row's
    position; each head attends over [0, pos]; nothing else in the cache changes."""
    g = torch.Generator().manual_seed(3)
    n_kv, n_rep, length = 2, 3, 48
    pos, slots = torch.tensor([37, 8]), torch.tensor([1, 0])
    qkv = torch.randn(2, (n_kv * n_rep + 2 * n_kv) * head_dim, generator=g)
    angles = torch.rand(2, head_dim // 2, generator=g) * 6.28
    rope = torch.stack([angles.cos(), angles.sin()], dim=-1)
    before_k, before_v = (torch.randn(2, n_kv, length, head_dim, generator=g) for _ in range(2))
    (cache_k, table), (cache_v, _) = (paged(c, 16, torch.Generator().manual_seed(5)) for c in (before_k, before_v))
    spare = [b for b in range(cache_k.shape[0]) if b not in table]
    spare_k = cache_k[spare].clone()
    out = torch.ops.llama_dist.cpu_decode_attention(qkv, rope, cache_k, cache_v, table, slots, pos, n_rep)
    assert torch.equal(cache_k[spare], spare_k)
    cache_k, cache_v = unpaged(cache_k, table, length), unpaged(cache_v, table, length)

    def rotate(x, b):  # [..., head_dim] by row b's angles, pairs (x[2i], x[2i + 1]) as complex numbers
        c = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(c * torch.polar(torch.ones_like(angles[b]).double(), angles[b].double())).flatten(-2)

    for b in range(2):
        q, k, v = qkv[b].split([n_kv * n_rep * head_dim, n_kv * head_dim, n_kv * head_dim])
        keys, values = before_k[slots[b]].double().clone(), before_v[slots[b]].double().clone()
        keys[:, pos[b]], values[:, pos[b]] = rotate(k.view(n_kv, head_dim), b), v.view(n_kv, head_dim).double()
        assert (cache_k[slots[b], :, pos[b]].double() - keys[:, pos[b]]).abs().max() < 1e-6
        assert torch.equal(cache_v[slots[b], :, pos[b]], v.view(n_kv, head_dim))
        seen = slice(0, pos[b] + 1)
        heads = rotate(q.view(n_kv * n_rep, head_dim), b)
        for h in range(n_kv * n_rep):
            w = torch.softmax(keys[h // n_rep, seen] @ heads[h] / head_dim ** 0.5, dim=0)
            expected = w @ values[h // n_rep, seen]
            assert (out[b, h * head_dim:(h + 1) * head_dim].double() - expected).abs().max() < 1e-5
    untouched = torch.ones(2, length, dtype=torch.bool)
    untouched[slots, pos] = False
    assert torch.equal(cache_k.transpose(1, 2)[untouched], before_k.transpose(1, 2)[untouched])


def test_gated_fold_holds_for_gates_far_from_zero():
    """The fold's SiLU uses a vector exp: gates of -200 (exp(200) overflows a float) to 50 give torch's silu."""
    layer = Q8BlockWeight(q8_0_blocks(torch.randint(-127, 128, (16, 64), dtype=torch.int8), torch.full((16, 2), 0.01)))
    gate_up = torch.tensor([[-200., -95., -89., -50., -1., 0., 1., 50.] * 8 + [0.5] * 64])
    want = layer(torch.nn.functional.silu(gate_up[:, :64]) * 0.5)
    assert ((layer.folded(gate_up, gated=True) - want).abs().max() / want.abs().max()).item() < 1e-3
