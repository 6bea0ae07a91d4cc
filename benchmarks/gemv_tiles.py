"""Every tile config of our one-row kernel (llama_dist/kernels/gemv_triton.py), timed alone on each Llama-2-7B
matrix, on one GPU: which tiles reach the read bandwidth and which fall short, with each one's registers.

    python benchmarks/gemv_tiles.py [--formats int4,int8,bf16 --dim 4096 --hidden 11008 --vocab 32000] [--wide]

The autotuner keeps one winner per shape and process, and winners differ from run to run by a few percent
(RESULTS.md, "Tiles kept on disk"); this prints the whole field per matrix, so a run shows whether the winners
stand out or tie, and how tile height, width and input splits (rows per program, bytes of each row read per
iteration, programs per SM, waves) relate to the fraction of the bandwidth reached. Plain products (no norm,
SwiGLU or residual folded in), timed as benchmarks/gemv_kernels.py times them (CUDA graphs over rotating copies,
so the weights come from memory, launched as the model launches them: programmatic dependent launches where the
GPU has them); each config's largest error against the fp32 product is printed beside it. --wide times a wider
field than the tuner's lists (1-8 warps, 4-256 rows, 256-1024 inputs, 1-4 parts), to find tiles to add to them.
Last, per format, the line through each matrix's best time against its bytes (`launch_cost`): what a launch costs
besides its bytes, and the rate the bytes stream at.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# (benchmarks/ is the script's folder)
from gemv_kernels import add_shape_arguments, decode_matrices, graph_time_us  # noqa: E402

from llama_dist.bench import read_bandwidth  # noqa: E402
from llama_dist.kernels import gemv_triton  # noqa: E402
from llama_dist.kernels.gemv import load  # noqa: E402
from llama_dist.quant.weights import int4_dequantize, int4_quantize, int4_words, int8_quantize  # noqa: E402


def launch(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None, y: torch.Tensor,
           config: triton.Config):
    """y = x W^T through the one-row kernel with this tile (no tuning); returns the compiled kernel."""
    args, flags = gemv_triton.plain_arguments(x, w, x if scales is None else scales, x, x, y, 0.0,
                                              scales is not None, norm=False, gated=False, add=False)
    meta = config.kwargs
    return gemv_triton._gemv_kernel[(triton.cdiv(y.shape[1], meta["BLOCK_N"]), meta["SPLIT_K"])](
        *args, **flags, **meta, num_warps=config.num_warps)


def wide_configs(fmt: str) -> list[triton.Config]:
    """Tiles of 1-8 warps, 4-256 rows, 256-1024 inputs and 1-4 parts of the inputs, with 4 to 32 words of weights
    per thread (one to eight 16-byte loads)."""
    inputs_per_word = {"int4": 8, "int8": 4, "bf16": 2}[fmt]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w)
            for w in (1, 2, 4, 8) for bn in (4, 8, 16, 32, 64, 128, 256) for bk in (256, 512, 1024)
            for sk in (1, 2, 4) if 4 <= bn * bk // inputs_per_word // (32 * w) <= 32]


def operands(fmt: str, ws: list[torch.Tensor]) -> tuple[list[tuple], torch.Tensor, int]:
    """(the copies' (weight, scales) as the kernel takes them, the first's dequantized fp32 matrix, bytes each)."""
    n, k = ws[0].shape
    if fmt == "bf16":
        return [(w, None) for w in ws], ws[0].float(), n * k * 2
    if fmt == "int8":
        q8 = [(q, s.to(torch.bfloat16)) for q, s in map(int8_quantize, ws)]
        return q8, q8[0][0].float() * q8[0][1].float()[:, None], n * k + n * 2
    copies = []
    for w in ws:
        q, scales, zeros = int4_quantize(w, 32)
        pairs = torch.stack([scales, zeros], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
        copies.append((int4_words(q), pairs))
    return copies, int4_dequantize(*int4_quantize(ws[0], 32)), n * k // 2 + n * k // 32 * 4


def launch_cost(points: list[tuple[int, float]]) -> dict:
    """The straight line through (bytes, us) of each matrix's best tile: a launch's fixed cost (us at zero bytes)
    and the rate its bytes stream at (TB/s), least squares. Where the rate is the read bandwidth, what a launch
    loses is its start and end, not its streaming: fewer or overlapped launches are the cure, not other tiles."""
    n = len(points)
    mean_b, mean_t = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    slope = (sum((b - mean_b) * (t - mean_t) for b, t in points)
             / sum((b - mean_b) ** 2 for b, _ in points))  # us per byte
    return {"fixed_us": round(mean_t - slope * mean_b, 2), "streaming_tb_s": round(1e-6 / slope, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default="int4,int8,bf16")
    add_shape_arguments(p)
    p.add_argument("--wide", action="store_true", help="a wider field of tiles than the tuner's (wide_configs)")
    a = p.parse_args()
    dev = torch.device("cuda")
    assert load(), "needs Triton"
    bw = read_bandwidth(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    shapes = decode_matrices(a)
    results, best = [], {}
    for name, (n, k) in shapes.items():
        copies = max(2, int(400e6 // (n * k * 2)))  # > 50 MB L2 several times over
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        for fmt in a.formats.split(","):
            weights, dense, nbytes = operands(fmt, ws)
            configs = wide_configs(fmt) if a.wide else {"bf16": gemv_triton._CONFIGS, "int8": gemv_triton._DP4A_CONFIGS,
                                                        "int4": gemv_triton._INT4_CONFIGS}[fmt]
            ref = x.float() @ dense.t()
            tiles = []
            for config in configs:
                kernel = launch(x, *weights[0], y, config)
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                us = graph_time_us(lambda i, c=config: launch(x, *weights[i], y, c), copies)
                meta = config.kwargs
                programs = triton.cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_K"]
                regs = getattr(kernel, "n_regs", None)
                per_sm = min(65536 // (regs * 32 * config.num_warps), 64 // config.num_warps) if regs else None
                tiles.append({"tile": [meta["BLOCK_N"], meta["BLOCK_K"]], "split_k": meta["SPLIT_K"],
                              "warps": config.num_warps, "us": round(us, 2),
                              "of_bandwidth": round(nbytes / us / 1e3 / (bw / 1e9), 3), "regs": regs,
                              "programs": programs, "waves": round(programs / (sms * per_sm), 2) if per_sm else None,
                              "max_rel_error": round(err, 5)})
            tiles.sort(key=lambda t: -t["of_bandwidth"])
            best.setdefault(fmt, []).append((nbytes, tiles[0]["us"]))
            row = {"shape": name, "n": n, "k": k, "format": fmt, "tiles": tiles}
            results.append(row)
            print(json.dumps({**row, "tiles": tiles[:3] + tiles[-1:]}), flush=True)  # best three and the worst
        del ws
    launches = {fmt: {**launch_cost(points), "read_tb_s": round(bw / 1e12, 3)}
                for fmt, points in best.items() if len(points) > 1}
    print(json.dumps({"launch_cost": launches}))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gemv_tiles.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(dev), "read_bandwidth_gbs": bw / 1e9, "sms": sms,
             "launch_cost": launches, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
