"""Where a decode step's time goes (compiled, or with --compile False the CUDA-graphed step): the host's time to
issue a step, the GPU's busy time, the wall time.

    python benchmarks/profile_decode.py --config llama-2-7b [--steps 32] [--compile False]
    torchrun --nproc_per_node 2 benchmarks/profile_decode.py --config llama-2-7b [--tag nccl]
    torchrun --nproc_per_node 2 benchmarks/profile_decode.py --prompt 512 --layers 8   # a plain prompt pass instead

Prints per token: wall ms, host ms to issue one step (the call returns before the GPU finishes), GPU kernel
ms (summed over kernels), the top kernels and, where the one-row product kernel runs them all, its time by
matrix (LLAMA_DIST_PDL=0 times each kernel alone). GPU time near the wall time: the kernels are the cost (set their
bytes against the bandwidth). GPU time well under it: the GPU waits, for the host (issue time near the wall
time) or for the other ranks.
"""
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import fire
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist.bench import CONFIGS, sync  # noqa: E402
from llama_dist.checkpoint.config import LoadConfig  # noqa: E402
from llama_dist.checkpoint.source import RandomSource  # noqa: E402
from llama_dist.distributed.context import init_distributed  # noqa: E402
from llama_dist.generation.llama import load_runner  # noqa: E402
from llama_dist.model.args import ModelArgs  # noqa: E402


def main(config: str = "llama-2-7b", steps: int = 32, top: int = 12, compile: bool = True, tag: str = "",
         prompt: int = 0, layers: int = 0, quantize: str = "none") -> None:
    """prompt: profile the plain forward pass of a prompt of this many tokens instead of decode steps; layers:
    only this many of the config's layers (a faster load); quantize: the weights' format (int8, int4)."""
    ctx = init_distributed("auto")
    args = ModelArgs.from_params_json(CONFIGS / f"{config}.json")
    source = RandomSource(dataclasses.replace(args, n_layers=layers) if layers else args, ctx.device)
    runner = load_runner(source, ctx, LoadConfig(dtype="bfloat16", n_ctx=1024, max_batch_size=1, compile=compile,
                                                          quantize=quantize),
                         progress=False)
    decode = runner.decode
    token, pos = torch.zeros(1, 1, dtype=torch.long, device=ctx.device), 16

    prompt_tokens = torch.zeros(1, prompt, dtype=torch.long, device=ctx.device)

    def step() -> None:
        nonlocal token, pos
        if prompt:
            runner.forward(prompt_tokens, 0, last_only=True)
            return
        token = ctx.comm.broadcast(decode(token, pos)[:, -1].argmax(-1, keepdim=True))
        pos += 1

    for _ in range(5):  # compile and warm up
        step()
    sync(ctx.device)
    issue, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        issue += time.perf_counter() - t
    sync(ctx.device)
    wall = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(ctx.device)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launches = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    for event in launches:
        kernels[event.name][0] += event.time_range.elapsed_us() / steps
        kernels[event.name][1] += 1 / steps
    gpu_ms = sum(us for us, _ in kernels.values()) / 1e3
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    per = "pass" if prompt else "token"
    result = {"config": config, "tp": ctx.tp_size, "compile": compile, "quantize": quantize, "tag": tag,
              "device": device, "prompt": prompt, "layers": layers or args.n_layers,
              f"wall_ms_per_{per}": wall * 1e3, f"host_issue_ms_per_{per}": issue / steps * 1e3,
              f"gpu_kernel_ms_per_{per}": gpu_ms, f"kernels_per_{per}": sum(n for _, n in kernels.values()),
              "top_kernels": [{"name": name[:90], f"us_per_{per}": round(us, 1), f"calls_per_{per}": round(n, 1)}
                              for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]]}
    if not prompt:
        result["products_us_per_token"] = products(launches, result["layers"], steps)
    if ctx.is_driver:
        print(json.dumps(result, indent=1))
        if os.environ.get("OUT"):
            name = f"profile_{config}_tp{ctx.tp_size}{tag and '_' + tag}.json"
            Path(os.environ["OUT"], name).write_text(json.dumps(result, indent=1))
    ctx.shutdown()


PRODUCTS = ("wqkv", "wo", "w13", "w2")  # a block's one-row products, in launch order; the output's after the last


def products(launches: list, n_layers: int, steps: int) -> dict[str, float] | None:
    """The one-row product kernel's time a token by matrix (by its place in the step's launches: each block's
    four in order, then the output), where it runs every product of the step (a single GPU's uncompiled step).
    With PDL a kernel's time includes its wait for the one before: set LLAMA_DIST_PDL=0 to time each alone."""
    calls = [e for e in launches if e.name.startswith("_gemv_kernel")]
    if len(calls) != steps * (len(PRODUCTS) * n_layers + 1):
        return None
    per = defaultdict(float)
    for i, event in enumerate(calls):
        place = i % (len(PRODUCTS) * n_layers + 1)
        per["output" if place == len(PRODUCTS) * n_layers else PRODUCTS[place % len(PRODUCTS)]] += \
            event.time_range.elapsed_us() / steps
    return {name: round(us, 1) for name, us in per.items()}


if __name__ == "__main__":
    fire.Fire(main)
