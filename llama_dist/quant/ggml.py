"""Vectorised dequantization of GGML block formats, in torch (so it runs wherever the weights go).

Each function turns raw blocks [n_blocks, type_size] (uint8) into values [n_blocks, block_size]
(float32). Layouts follow ggml-common.h; bit tricks are batched over all blocks at once.
"""
from __future__ import annotations

from typing import Callable

import torch

QK_K = 256


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes [n, 2] -> float32 [n, 1]."""
    return raw.contiguous().view(torch.float16).float()


def _bits(x: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """x [..., m] -> [..., len(shifts), m]: (x >> shift) & mask for each shift."""
    s = torch.tensor(shifts, dtype=x.dtype, device=x.device).view(-1, 1)
    return (x.unsqueeze(-2) >> s) & mask


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] packed bytes -> [n, 32]: low nibbles are elements 0-15, high nibbles 16-31."""
    return _bits(qs, [0, 4], 0x0F).flatten(-2)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] single bits."""
    return _bits(qh.contiguous().view(torch.int32), list(range(32)), 1).flatten(-2)


def q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]).int() | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]).int() | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, QK_K)


def q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(scales[:, :8], [0, 4], 0x0F).reshape(n, 16)
    high = _bits(scales[:, 8:12], [0, 2, 4, 6], 3).reshape(n, 16)
    sc = (low | (high << 4)).int() - 32
    dl = (d * sc.float()).view(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).int()
    qh = _bits(hmask.reshape(n, 1, 32), list(range(8)), 1).reshape(n, 16, 16).int()
    q = ql - ((qh ^ 1) << 2)  # a cleared high bit means "subtract 4"
    return (dl * q.float()).view(n, QK_K)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K / Q5_K)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d, dm = (_f16(b[:, :2]) * sc).view(n, 8, 1), (_f16(b[:, 2:4]) * mn).view(n, 8, 1)
    q = _bits(b[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32).float()
    return (d * q - dm).view(n, QK_K)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d, dm = (_f16(b[:, :2]) * sc).view(n, 8, 1), (_f16(b[:, 2:4]) * mn).view(n, 8, 1)
    ql = _bits(b[:, 48:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 32), list(range(8)), 1).reshape(n, 8, 32)
    return (d * (ql | (qh << 4)).float() - dm).view(n, QK_K)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    low = _bits(ql.reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 8, 32)
    q = (low | (high << 4)).int() - 32
    return (d * q.view(n, 16, 16).float()).view(n, QK_K)


def _plain(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda b: b.contiguous().view(dtype).float()


# GGML type name -> (elements per block, bytes per block, dequantizer)
BLOCK_TYPES: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "F32": (1, 4, _plain(torch.float32)),
    "F16": (1, 2, _plain(torch.float16)),
    "BF16": (1, 2, _plain(torch.bfloat16)),
    "Q4_0": (32, 18, q4_0),
    "Q4_1": (32, 20, q4_1),
    "Q5_0": (32, 22, q5_0),
    "Q5_1": (32, 24, q5_1),
    "Q8_0": (32, 34, q8_0),
    "Q2_K": (QK_K, 84, q2_k),
    "Q3_K": (QK_K, 110, q3_k),
    "Q4_K": (QK_K, 144, q4_k),
    "Q5_K": (QK_K, 176, q5_k),
    "Q6_K": (QK_K, 210, q6_k),
}


def dequantize_rows(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """Raw bytes [rows, row_bytes] of one GGML type -> float32 [rows, row_elements]."""
    block, size, fn = BLOCK_TYPES[type_name]
    rows = raw.shape[0]
    return fn(raw.reshape(-1, size)).reshape(rows, -1)


def _as_f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, k] -> fp16 little-endian bytes [n * k, 2]."""
    return x.half().contiguous().view(torch.uint8).reshape(-1, 2)


def _q4_0_as_q4_1(b: torch.Tensor) -> torch.Tensor:
    """d * (q - 8) = d * q + m with m = -8 d (exact in fp16); the nibbles are laid out alike."""
    return torch.cat([b[:, :2], _as_f16_bytes(-8 * _f16(b[:, :2])), b[:, 2:]], dim=1)


def _q4_k_as_q4_1(b: torch.Tensor) -> torch.Tensor:
    """A super-block of 256 is 8 groups of 32, each d * sc_j * q - dmin * m_j: Q4_1 blocks with d = d * sc_j and
    m = -dmin * m_j (products rounded to fp16), nibbles re-paired as Q4_1 pairs them (i with 16 + i)."""
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d, m = _as_f16_bytes(_f16(b[:, :2]) * sc), _as_f16_bytes(-(_f16(b[:, 2:4]) * mn))
    q = _bits(b[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n * 8, 32)
    return torch.cat([d, m, q[:, :16] | (q[:, 16:] << 4)], dim=1)


# GGML types whose blocks are Q4_1 blocks (value = d * q + m per 32 weights) once their bytes are moved.
AS_Q4_1 = {"Q4_0": _q4_0_as_q4_1, "Q4_1": lambda b: b, "Q4_K": _q4_k_as_q4_1}


def as_q4_1_rows(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """Raw rows of a Q4_0/Q4_1/Q4_K tensor -> GGUF Q4_1 rows [rows, cols / 32 * 20]."""
    _, size, _ = BLOCK_TYPES[type_name]
    rows = raw.shape[0]
    return AS_Q4_1[type_name](raw.reshape(-1, size)).reshape(rows, -1)


def int4_groups_rows(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 rows -> int4 groups of 32: (q [rows, cols] in 0..15, scales, zeros [rows, cols / 32]),
    value = (q - 8) * scale + zero."""
    rows = raw.shape[0]
    b = raw.reshape(-1, BLOCK_TYPES["Q4_1"][1])
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:]).reshape(rows, -1), d.reshape(rows, -1), (m + 8 * d).reshape(rows, -1)
