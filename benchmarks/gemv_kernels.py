"""Our Triton matrix-vector kernel (llama_dist/kernels/gemv.py) against PyTorch's, per Llama-2-7B matrix, on one GPU.

    python benchmarks/gemv_kernels.py [--dim 4096 --hidden 11008 --vocab 32000]

For each weight shape of a decoded token (fused q/k/v, wo, fused w1/w3, w2, output): bf16 with our kernel vs
F.linear (cuBLAS) vs inductor's compiled F.linear; int8 with our kernel vs inductor's fused
dequantize-and-matmul. Each in GB/s of weights
read and as a fraction of the measured read bandwidth, timed with CUDA graphs over rotating copies (so the
weights come from memory, not L2). Also checks each result against an fp32 reference (GPU-only check).
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
from llama_dist.quant.weights import int8_quantize  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    a = p.parse_args()
    dev = torch.device("cuda")
    assert load(), "needs Triton"
    bw = read_bandwidth(dev)
    shapes = {"wqkv": (3 * a.dim, a.dim), "wo": (a.dim, a.dim), "w13": (2 * a.hidden, a.dim),
              "w2": (a.dim, a.hidden), "output": (a.vocab, a.dim)}
    compiled_linear = torch.compile(lambda x, w: torch.nn.functional.linear(x, w))
    compiled_int8 = torch.compile(lambda x, q, s: torch.nn.functional.linear(x, q.to(x.dtype)) * s)
    rows = []
    for name, (n, k) in shapes.items():
        copies = max(2, int(400e6 // (n * k * 2)))  # > 50 MB L2 several times over
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = x.float() @ ws[0].float().t()
        q8 = [int8_quantize(w) for w in ws]
        q8 = [(q, s.to(torch.bfloat16)) for q, s in q8]
        checks = {
            "bf16 ours": gemv(x, ws[0]),
            "int8 ours": gemv(x, *q8[0]),
        }
        errors = {key: float((y.float() - ref).abs().max() / ref.abs().max()) for key, y in checks.items()}
        bytes_bf16, bytes_int8 = n * k * 2, n * k + n * 2
        timings = {
            "bf16 ours": (graph_time_us(lambda i: gemv(x, ws[i]), copies), bytes_bf16),
            "bf16 cuBLAS": (graph_time_us(lambda i: torch.nn.functional.linear(x, ws[i]), copies), bytes_bf16),
            "bf16 inductor": (graph_time_us(lambda i: compiled_linear(x, ws[i]), copies), bytes_bf16),
            "int8 ours": (graph_time_us(lambda i: gemv(x, *q8[i]), copies), bytes_int8),
            "int8 inductor": (graph_time_us(lambda i: compiled_int8(x, *q8[i]), copies), bytes_int8),
        }
        row = {"shape": name, "n": n, "k": k, "max_rel_error": errors}
        for key, (us, nbytes) in timings.items():
            row[key] = {"us": round(us, 2), "GB/s": round(nbytes / us / 1e3, 1),
                        "of_bandwidth": round(nbytes / us / 1e3 / (bw / 1e9), 3)}
        rows.append(row)
        print(json.dumps(row))
    result = {"device": torch.cuda.get_device_name(dev), "read_bandwidth_gbs": bw / 1e9, "rows": rows}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gemv_kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
