"""Our Triton matmul kernels (llama_dist/kernels/gemv.py, quant_matmul.py) against PyTorch's, per Llama-2-7B matrix,
on one GPU.

    python benchmarks/gemv_kernels.py [--dim 4096 --hidden 11008 --vocab 32000 --rows "(8,32,512)"]

One row, for each weight shape of a decoded token (fused q/k/v, wo, fused w1/w3, w2, output): bf16 with our kernel
vs F.linear (cuBLAS) vs inductor's compiled F.linear; int8 with our kernel (8-bit activations, dp4a) vs
inductor's fused dequantize-and-matmul; int4 (groups of 32) with our kernel (8-bit activations, dp4a) vs
PyTorch's `_weight_int4pack_mm`. Then several rows: bf16 cuBLAS beside int8 and int4 through our tensor-core
kernel, through their matrix dequantized by our kernel with cuBLAS, int8 through its converted matrix with cuBLAS
(the plain module's way) and int4 through PyTorch's kernel. Each in GB/s of weights read and as a fraction of the
measured read bandwidth, timed with CUDA
graphs over rotating copies (so the weights come from memory, not L2), with each result's error against an fp32
reference (GPU-only check).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist.bench import read_bandwidth  # noqa: E402
from llama_dist.kernels.gemv import gemv, load  # noqa: E402
from llama_dist.kernels.quant_matmul import load as load_quantized  # noqa: E402
from llama_dist.quant.weights import int4_dequantize, int4_quantize, int4_words, int8_quantize  # noqa: E402


def graph_time_us(fn, copies: int) -> float:
    """Mean time of one call, from a CUDA graph that calls fn on each of the rotating copies 10 times."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            for i in range(copies):
                fn(i)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (10 * copies))
    return sorted(times)[len(times) // 2]


def int4_peer(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CUDA int4 layout (tinygemm, gpt-fast's kernel): packed [out/8, in/(16*8), 32, 4], and
    (scale, zero) [groups, out, 2] in bf16."""
    packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
    return packed, torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """--dim, --hidden and --vocab, Llama-2-7B's by default."""
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)


def decode_matrices(a: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(outputs, inputs) of each weight a decoded token reads: fused q/k/v, wo, fused w1/w3, w2, output."""
    return {"wqkv": (3 * a.dim, a.dim), "wo": (a.dim, a.dim), "w13": (2 * a.hidden, a.dim),
            "w2": (a.dim, a.hidden), "output": (a.vocab, a.dim)}


def main() -> None:
    p = argparse.ArgumentParser()
    add_shape_arguments(p)
    p.add_argument("--rows", default="(8,32,512)", help="row counts for the several-row products")
    a = p.parse_args()
    dev = torch.device("cuda")
    assert load() and load_quantized(), "needs Triton"
    bw = read_bandwidth(dev)
    shapes = decode_matrices(a)
    compiled_linear = torch.compile(lambda x, w: torch.nn.functional.linear(x, w))
    compiled_int8 = torch.compile(lambda x, q, s: torch.nn.functional.linear(x, q.to(x.dtype)) * s)
    several = [int(r) for r in a.rows.strip("()[] ").split(",") if r.strip()]  # "()": one row only
    rows = []
    for name, (n, k) in shapes.items():
        copies = max(2, int(400e6 // (n * k * 2)))  # > 50 MB L2 several times over
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        q8 = [(q, s.to(torch.bfloat16)) for q, s in map(int8_quantize, ws)]
        q4, words = [], []
        for w in ws:
            q, scales, zeros = int4_quantize(w, 32)
            q4.append(int4_peer(q, scales, zeros))
            words.append((int4_words(q), q4[-1][1]))
        references = {"bf16": ws[0].float(), "int8": q8[0][0].float() * q8[0][1].float()[:, None],
                      "int4": int4_dequantize(*int4_quantize(ws[0], 32))}
        nbytes = {"bf16": n * k * 2, "int8": n * k + n * 2, "int4": n * k // 2 + n * k // 32 * 4}
        for m in [1] + several:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            if m == 1:
                candidates = {
                    "bf16 ours": ("bf16", lambda i: gemv(x, ws[i])),
                    "bf16 cuBLAS": ("bf16", lambda i: torch.nn.functional.linear(x, ws[i])),
                    "bf16 inductor": ("bf16", lambda i: compiled_linear(x, ws[i])),
                    "int8 ours": ("int8", lambda i: gemv(x, *q8[i])),
                    "int8 inductor": ("int8", lambda i: compiled_int8(x, *q8[i])),
                    "int4 ours": ("int4", lambda i: gemv(x, *words[i])),
                    "int4 PyTorch": ("int4", lambda i: torch._weight_int4pack_mm(x, q4[i][0], 32, q4[i][1])),
                }
            else:
                candidates = {
                    "bf16 cuBLAS": ("bf16", lambda i: torch.nn.functional.linear(x, ws[i])),
                    "int8 ours tensor cores": ("int8", lambda i: torch.ops.llama_dist.int8_matmul(x, *q8[i])),
                    "int8 converted + cuBLAS": ("int8", lambda i: torch.nn.functional.linear(
                        x, q8[i][0].to(x.dtype)) * q8[i][1]),
                    "int4 PyTorch": ("int4", lambda i: torch._weight_int4pack_mm(x, q4[i][0], 32, q4[i][1])),
                    "int4 ours tensor cores": ("int4", lambda i: torch.ops.llama_dist.int4_matmul(x, *words[i])),
                    "int8 dequantized (ours) + cuBLAS": ("int8", lambda i: torch.nn.functional.linear(
                        x, torch.ops.llama_dist.dequantize(q8[i][0], q8[i][1], x.dtype))),
                    "int4 dequantized (ours) + cuBLAS": ("int4", lambda i: torch.nn.functional.linear(
                        x, torch.ops.llama_dist.dequantize(*words[i], x.dtype))),
                }
            row = {"shape": name, "n": n, "k": k, "rows": m}
            for key, (kind, fn) in candidates.items():
                ref = x.float() @ references[kind].t()
                err = float((fn(0).float() - ref).abs().max() / ref.abs().max())
                us = graph_time_us(fn, copies)
                row[key] = {"us": round(us, 2), "GB/s": round(nbytes[kind] / us / 1e3, 1),
                            "of_bandwidth": round(nbytes[kind] / us / 1e3 / (bw / 1e9), 3),
                            "TFLOP/s": round(2 * m * n * k / us / 1e6, 1), "max_rel_error": round(err, 5)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name(dev), "read_bandwidth_gbs": bw / 1e9, "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gemv_kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
