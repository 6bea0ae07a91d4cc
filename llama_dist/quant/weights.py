"""Quantized weights that replace a layer's dense matrix: y = x W^T from int8 or int4 storage.

int8: symmetric, one scale per output channel. int4: asymmetric, a scale and a zero per group
of `group_size` inputs, value = (q - 8) * scale + zero, q in 0..15, which is exactly the form of
GGUF's Q4_0, Q4_1 and Q4_K blocks, so those load without requantization.

Kernels: on CPUs, int4 groups of 32 become Q4_1 blocks for our C++ block matmul with 8-bit activations
(csrc/block_matmul.cpp), as GGUF's Q4_0 and Q8_0 tensors stay Q4_0 and Q8_0 blocks (each in row groups of 16
rows interleaved); without that kernel, PyTorch's packed matmuls with bf16 activations (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`). On CUDA int4 groups of 32 are kept as words for our kernels (one row, a few
rows, and prompts dequantized from them: kernels/quant_matmul.py, installed over Int4Weight and Int8Weight), and
in `_weight_int4pack_mm`'s layout too only where those kernels do not run (pack_for_pytorch); other groups take
`_weight_int4pack_mm`; elsewhere the matrix is dequantized on the fly.
Quantization happens after sharding, on each rank's own slice.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ggml import BLOCK_TYPES, as_q4_1_rows, int4_groups_rows
from .. import csrc
from ..csrc import BLOCK

QUANT_TYPES = ("int8", "int4")
Q4_1_BYTES = BLOCK_TYPES["Q4_1"][1]  # fp16 d, fp16 m, 16 bytes of nibbles: value = d * q + m
Q4_0_BYTES = BLOCK_TYPES["Q4_0"][1]  # fp16 d, 16 bytes of nibbles: value = d * (q - 8)
Q8_0_BYTES = BLOCK_TYPES["Q8_0"][1]  # fp16 d, 32 int8 values
GROUP_ROWS = 16  # weight rows interleaved in a row group of the CPU kernels (csrc/block_matmul.cpp)


BLOCK_FORMATS = ("q4_1", "q4_0", "q8_0")  # the C++ kernels' weight formats, by their codes in csrc/decode_step.cpp


class QuantizedWeight(nn.Module):
    """Called on activations x [..., in]: returns x W^T [..., out]."""

    out_features: int
    in_features: int

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W, its scales) for the CUDA one-row kernel (kernels/gemv.py), where it can read this format (the
        kernel tells int8 rows from int4 words by W's dtype)."""
        return None

    def folded(self, x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False,
               residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """residual + f(x) W^T in one call, f(x) being RMSNorm(x) * norm_weight, or silu(gate) * up of x = [gate, up],
        or x: where this format's kernel folds those in (the CPU block kernels, block_operands); None elsewhere."""
        operands = self.block_operands()
        if operands is None:
            return None
        code, blocks, n = operands
        matmul = getattr(torch.ops.llama_dist, f"{BLOCK_FORMATS[code]}_matmul")
        return matmul(x, blocks, n, norm_weight, eps, gated, residual)

    def block_operands(self) -> tuple[int, torch.Tensor, int] | None:
        """(format code in BLOCK_FORMATS, blocks, out_features) where the CPU block kernels read this weight."""
        return None


class Int8Weight(QuantizedWeight):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.act_dtype = act_dtype
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scales", scales.to(act_dtype).contiguous())

    @classmethod
    def quantize(cls, w: torch.Tensor, act_dtype: torch.dtype) -> "Int8Weight":
        return cls(*int8_quantize(w), act_dtype)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.float()[:, None]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantized matrix: an int8 embedding table looked up without expanding it."""
        return self.q[ids].float() * self.scales[ids, None].float()

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q, self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.act_dtype), self.q, self.scales)
            return y.reshape(*shape[:-1], -1).to(x.dtype)
        # (On CUDA the installed kernels replace this: kernels/quant_matmul.py. PyTorch's packed int8 CUDA kernel
        # is far slower at batch 1: RESULTS.md.)
        return torch.nn.functional.linear(x, self.q.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Weight(QuantizedWeight):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 act_dtype: torch.dtype):
        """q [out, in] in 0..15; scales, zeros [out, in / group_size]."""
        self._setup(q.shape, group_size, act_dtype, q.device.type)
        if self.uses_blocks:
            self._use_blocks(q4_row_groups(q4_1_rows(q, scales, zeros), Q4_1_BYTES), "q4_1")
            return
        q = q.to(torch.int32)
        if self.device_type == "cuda" and group_size == BLOCK:  # our kernels' words; PyTorch's copy on demand
            self.register_buffer("words", int4_words(q))
        elif self.device_type == "cuda":
            self.register_buffer("packed", _cuda_int4pack(q))
        else:
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 2)
                                 if self.device_type == "cpu" else q.to(torch.uint8))
        # The kernels want [groups, out, 2] of (scale, zero) in the activation dtype.
        self.register_buffer("scales_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1)
                             .to(act_dtype).contiguous())

    def _setup(self, shape: tuple[int, int], group_size: int, act_dtype: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.group_size, self.act_dtype, self.device_type = group_size, act_dtype, device_type
        self.uses_blocks = self._blocks_on(device_type, group_size)

    @staticmethod
    def _blocks_on(device_type: str, group_size: int) -> bool:
        """Whether the CPU kernel's Q4_1 row groups serve: they hold a scale per 32 weights, so coarser
        groups keep their smaller packed form."""
        return device_type == "cpu" and group_size == BLOCK and csrc.available()

    def _use_blocks(self, groups: torch.Tensor, block_format: str) -> None:
        """Row groups for the CPU kernel of their format (csrc/block_matmul.cpp): "q4_1" or "q4_0"."""
        self.register_buffer("blocks", groups)
        self.block_format = block_format

    @classmethod
    def from_gguf(cls, rows: torch.Tensor, type_name: str, act_dtype: torch.dtype) -> "Int4Weight":
        """GGUF Q4_1 or Q4_0 rows [out, in / 32 * 20 or 18]. Where the CPU kernel runs, its row groups are these
        bytes reordered (no unpacking, so a faster load; Q4_0 stays 18 bytes per block); elsewhere they unpack
        into groups."""
        if not cls._blocks_on(rows.device.type, BLOCK):
            return cls(*int4_groups_rows(as_q4_1_rows(rows, type_name)), BLOCK, act_dtype)
        block_bytes = BLOCK_TYPES[type_name][1]
        weight = cls.__new__(cls)
        weight._setup((rows.shape[0], rows.shape[1] // block_bytes * BLOCK), BLOCK, act_dtype, "cpu")
        weight._use_blocks(q4_row_groups(rows, block_bytes), type_name.lower())
        return weight

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int, act_dtype: torch.dtype) -> "Int4Weight":
        return cls(*int4_quantize(w, group_size), group_size, act_dtype)

    def pack_for_pytorch(self) -> None:
        """PyTorch's packed copy of the words, for its int4 kernel where ours do not take this weight (CUDA
        without Triton, LLAMA_DIST_GEMV=0): kept only there, as it doubles the weight's memory."""
        if hasattr(self, "words") and not hasattr(self, "packed"):
            self.register_buffer("packed", _cuda_int4pack(int4_from_words(self.words)), persistent=False)

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """On CUDA, groups of 32: the words and the (scale, zero) pairs [groups, out, 2]."""
        words = getattr(self, "words", None)
        return None if words is None else (words, self.scales_zeros)

    def _dense(self) -> torch.Tensor:
        """Devices without a packed kernel keep q unpacked and dequantize on the fly."""
        sz = self.scales_zeros.float().transpose(0, 1)  # [out, groups, 2]
        return int4_dequantize(self.packed, sz[..., 0], sz[..., 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_blocks:
            return self.folded(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.act_dtype)
        if self.device_type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        elif self.device_type == "cuda":
            if not hasattr(self, "packed"):
                raise RuntimeError("This int4 weight holds only the words our CUDA kernels read: after load_model, "
                                   "call llama_dist.kernels.install(model, choose_kernels(device)), as load_runner "
                                   "and Llama.build do (it keeps PyTorch's packed copy where ours do not run).")
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_zeros)
        else:
            y = x2 @ self._dense().to(x2.dtype).t()
        return y.reshape(*shape[:-1], -1).to(x.dtype)

    def block_operands(self) -> tuple[int, torch.Tensor, int] | None:
        return (BLOCK_FORMATS.index(self.block_format), self.blocks, self.out_features) if self.uses_blocks else None


class Q8BlockWeight(QuantizedWeight):
    """GGUF Q8_0: int8 with one fp16 scale per block of 32 inputs, in the CPU kernel's row groups. CPU only."""

    def __init__(self, blocks: torch.Tensor):
        """blocks: GGUF Q8_0 rows [out, in / 32 * 34] (q8_0_blocks makes them from int8 and scales)."""
        super().__init__()
        self.out_features, self.in_features = blocks.shape[0], blocks.shape[1] // Q8_0_BYTES * BLOCK
        self.register_buffer("blocks", q8_row_groups(blocks))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantized matrix: a Q8_0 embedding table looked up without expanding it."""
        flat, nb = ids.reshape(-1), self.in_features // BLOCK
        count, row = len(flat), flat % GROUP_ROWS
        groups = self.blocks.view(-1, nb, GROUP_ROWS * Q8_0_BYTES)[flat // GROUP_ROWS]  # [count, blocks, 544]
        each = torch.arange(count)
        d = groups[..., :2 * GROUP_ROWS].view(count, nb, GROUP_ROWS, 2)[each, :, row].view(torch.float16)
        codes = groups[..., 2 * GROUP_ROWS:].view(count, nb, BLOCK // 4, GROUP_ROWS, 4)[each, :, :, row]
        values = (codes.reshape(count, nb, BLOCK).to(torch.int16) - 128).float() * d.float()
        return values.reshape(*ids.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.folded(x)

    def block_operands(self) -> tuple[int, torch.Tensor, int]:
        return BLOCK_FORMATS.index("q8_0"), self.blocks, self.out_features


def q4_1_rows(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """int4 groups of 32 -> GGUF Q4_1 rows [out, in / 32 * 20]: d = scale, m = zero - 8 * scale, and
    byte i of a block holds input i in its low nibble and input 16 + i in its high one."""
    out_f, in_f = q.shape
    d, m = scales.float(), zeros.float() - 8 * scales.float()
    head = torch.stack([d, m], dim=-1).to(torch.float16).view(torch.uint8)  # [out, blocks, 4]
    qb = q.to(torch.uint8).view(out_f, -1, 2, 16)
    return torch.cat([head, qb[:, :, 0] | (qb[:, :, 1] << 4)], dim=-1).reshape(out_f, -1)


def q4_row_groups(rows: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """GGUF Q4_1 (or Q4_0) rows -> row groups [ceil(out / 16), in / 32 * 16 * block_bytes] for the CPU kernel: per
    16 rows and block of 32 inputs, fp16 d[16], fp16 m[16] (Q4_1 only), then 256 bytes where byte 64c + 32h + 4j + t
    is row 8h + j's byte 4c + t (inputs 4c + t and 16 + 4c + t). Only bytes move."""
    fields = (block_bytes - 16) // 2  # d, or d and m

    def interleave(r: torch.Tensor) -> torch.Tensor:  # [groups, 16, blocks, block_bytes]
        groups, _, blocks, _ = r.shape
        head = r[..., :2 * fields].view(groups, GROUP_ROWS, blocks, fields, 2).permute(0, 2, 3, 1, 4)  # [g, b, d|m, j, 2]
        body = r[..., 2 * fields:].view(groups, 2, 8, blocks, 4, 4).permute(0, 3, 4, 1, 2, 5)  # [g, b, c, h, j, t]
        return torch.cat([head.reshape(groups, blocks, 32 * fields), body.reshape(groups, blocks, 256)], dim=-1)

    return _row_groups(rows, block_bytes, interleave)


def q8_row_groups(rows: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 rows -> row groups [ceil(out / 16), in / 32 * 16 * 34] for the CPU kernel: per 16 rows and block
    of 32 inputs, fp16 d[16], then 512 bytes where byte 64s + 4j + t is row j's input 4s + t plus 128."""

    def interleave(r: torch.Tensor) -> torch.Tensor:  # [groups, 16, blocks, 34]
        groups, _, blocks, _ = r.shape
        head = r[..., :2].permute(0, 2, 1, 3)  # [g, b, j, 2 bytes]
        body = r[..., 2:].view(groups, GROUP_ROWS, blocks, 8, 4).permute(0, 2, 3, 1, 4) ^ 0x80  # [g, b, s, j, t]
        return torch.cat([head.reshape(groups, blocks, 32), body.reshape(groups, blocks, 512)], dim=-1)

    return _row_groups(rows, Q8_0_BYTES, interleave)


def _row_groups(rows: torch.Tensor, block_bytes: int,
                interleave: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """GGUF rows, padded to whole groups of 16 (zero rows; the kernel drops their outputs), through
    interleave([groups, 16, blocks, block_bytes]) 256 groups at a time, so the copies it makes stay small."""
    r = F.pad(rows, (0, 0, 0, -rows.shape[0] % GROUP_ROWS)) if rows.shape[0] % GROUP_ROWS else rows
    groups, blocks = r.shape[0] // GROUP_ROWS, r.shape[1] // block_bytes
    out = torch.empty(groups, blocks * GROUP_ROWS * block_bytes, dtype=torch.uint8, device=rows.device)
    for g in range(0, groups, 256):
        chunk = r[g * GROUP_ROWS:(g + 256) * GROUP_ROWS].reshape(-1, GROUP_ROWS, blocks, block_bytes)
        out[g:g + 256] = interleave(chunk).reshape(chunk.shape[0], -1)
    return out


def q8_0_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] with a scale per 32 inputs -> GGUF Q8_0 blocks [out, in / 32 * 34]."""
    out_f, in_f = q.shape
    head = scales.to(torch.float16).reshape(out_f, -1, 1).view(torch.uint8)  # [out, blocks, 2]
    body = q.to(torch.int8).reshape(out_f, -1, BLOCK).view(torch.uint8)
    return torch.cat([head, body], dim=-1).reshape(out_f, -1).contiguous()


def q8_0_quantize(w: torch.Tensor) -> torch.Tensor:
    """float [out, in] -> GGUF Q8_0 blocks [out, in / 32 * 34], as llama.cpp quantizes: d = amax / 127 per block of
    32, q = round(w / d)."""
    blocks = w.float().reshape(w.shape[0], -1, BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(d > 0, d, torch.ones_like(d))).clamp(-127, 127)
    return q8_0_blocks(q.reshape(w.shape), d.reshape(w.shape[0], -1))


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric, one scale per output row: (q int8 [out, in], scales [out])."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def int4_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max asymmetric groups along the input dim: (q [out, in] in 0..15, scales, zeros [out, groups])."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"int4 groups of {group_size} do not divide this shard's {in_f} inputs; "
                         "choose a group size that divides it (32, 64 or 128).")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15)
    zeros = lo + 8 * scales  # value = (q - 8) * scale + zero
    return q.reshape(out_f, in_f).to(torch.int32), scales, zeros


def int4_words(q: torch.Tensor) -> torch.Tensor:
    """int4 q [out, in] (0..15) -> int32 words [out, in / 8] for the CUDA one-row kernel's dp4a: byte b of word j
    holds input 8j + b in its low nibble and input 8j + 4 + b in its high one, so masking the low or the high
    nibbles gives four consecutive inputs."""
    out_f, in_f = q.shape
    halves = q.to(torch.int64).view(out_f, in_f // 8, 2, 4)
    words = ((halves[:, :, 0] | (halves[:, :, 1] << 4)) << torch.arange(0, 32, 8, device=q.device)).sum(-1)
    return (words - (words >= 2 ** 31) * 2 ** 32).to(torch.int32)


def int4_from_words(words: torch.Tensor) -> torch.Tensor:
    """int4_words reversed: int32 words [out, in / 8] -> q [out, in] (0..15), int32."""
    data = (words.to(torch.int64)[..., None] >> torch.arange(0, 32, 8, device=words.device)) & 0xFF
    return torch.cat([data & 0xF, data >> 4], -1).reshape(words.shape[0], -1).to(torch.int32)


def _cuda_int4pack(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] (0..15) in the layout of PyTorch's CUDA int4 kernel (`_weight_int4pack_mm`)."""
    return torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)


def int4_dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    g = q.float().reshape(out_f, scales.shape[1], -1)
    return ((g - 8) * scales[..., None] + zeros[..., None]).reshape(out_f, in_f)


def quantize_weight(w: torch.Tensor, kind: str, group_size: int, act_dtype: torch.dtype) -> QuantizedWeight:
    if kind == "int8":
        return Int8Weight.quantize(w, act_dtype)
    if kind == "int4":
        return Int4Weight.quantize(w, group_size, act_dtype)
    raise ValueError(f"Unknown quantization {kind!r}; choose one of {', '.join(QUANT_TYPES)}.")


def quantized_from_shards(shards: list, act_dtype: torch.dtype, device) -> QuantizedWeight:
    """A weight from stored quantized slices (QuantizedShard), concatenated along the output dim."""
    kind = shards[0].kind
    q = torch.cat([s.q for s in shards]).to(device)
    if kind == "q8_0":
        return Q8BlockWeight(q)
    if kind in ("q4_1", "q4_0"):
        return Int4Weight.from_gguf(q, kind.upper(), act_dtype)
    scales = torch.cat([s.scales for s in shards]).to(device)
    if kind == "int8":
        return Int8Weight(q, scales, act_dtype)
    zeros = torch.cat([s.zeros for s in shards]).to(device)
    return Int4Weight(q, scales, zeros, shards[0].group_size, act_dtype)
