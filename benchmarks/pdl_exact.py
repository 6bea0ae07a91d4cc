"""Programmatic dependent launch changes when our decode kernels start, never what they compute: in one process
(so the same tuned tiles), greedy decode with PDL launches, without, and with again must give bit-identical
logits. GPUs of sm_90 and later (elsewhere PDL is off and the three runs are the same run).

    python benchmarks/pdl_exact.py [--config llama-2-7b --quantize int4 --steps 64]

Prints one JSON line: each run's tokens/s at batch 1 and 8, and whether the greedy tokens and the top two logits
of every batch-1 step are equal to the first run's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist.bench import CONFIGS, decode_tok_s  # noqa: E402
from llama_dist.checkpoint.source import RandomSource  # noqa: E402
from llama_dist.distributed.context import init_distributed  # noqa: E402
from llama_dist.generation.llama import load_runner, make_configs  # noqa: E402
from llama_dist.kernels import gemv_triton  # noqa: E402
from llama_dist.model.args import ModelArgs  # noqa: E402


def main(config: str = "llama-2-7b", quantize: str = "none", steps: int = 64) -> None:
    load, parallel = make_configs(config, 1024, 8, compile=False, quantize=quantize, dtype="bfloat16")
    ctx = init_distributed(parallel.backend, parallel.device, pp=parallel.pp)
    args = ModelArgs.from_params_json(CONFIGS / f"{config}.json")
    runs = []
    available = gemv_triton._GDC.value  # (the kernels hold griddepcontrol only where the GPUs take it)
    for pdl in (available, False, available):
        gemv_triton._PDL = pdl  # (read at each launch; the kernels and their tiles stay the same)
        runner = load_runner(RandomSource(args, ctx.device), ctx, load, parallel, progress=False)
        run = {"pdl": pdl}
        for batch in (1, 8):
            greedy, top2 = [], []
            run[f"b{batch}_tok_s"] = decode_tok_s(runner, ctx, batch, steps, greedy=greedy,
                                                  top2=top2 if batch == 1 else None)
            run[f"b{batch}_greedy"] = greedy
            if batch == 1:
                run["top2"] = top2
        runs.append(run)
        del runner
        torch.cuda.empty_cache()
    first = runs[0]
    print(json.dumps({"config": config, "quantize": quantize, "pdl_available": available, "runs": [
        {"pdl": r["pdl"], "b1_tok_s": r["b1_tok_s"], "b8_tok_s": r["b8_tok_s"],
         "greedy_equal": r["b1_greedy"] == first["b1_greedy"] and r["b8_greedy"] == first["b8_greedy"],
         "top2_equal": r["top2"] == first["top2"]} for r in runs]}))


if __name__ == "__main__":
    fire.Fire(main)
