"""Where greedy text at several tensor-parallel ranks parts from one process's, and why (issue 21's rule).

A row-parallel product (attention's wo, the feed-forward's w2) sums each rank's share of the inner dimension and
then adds the ranks' partial sums, so the logits differ from one process's by the summation order at least; a
greedy step changes only where the two likeliest tokens are closer than the difference. This script measures both
on Meta's first prompt with the bundled model: each world size generates greedily, then reads one process's text
back (teacher forcing); it prints the logit differences, where the choice flips, and one process's margin between
its two likeliest tokens there (benchmarks/RESULTS.md has the figures: dense fp32 and the default quantized path).

    python benchmarks/tp_agreement.py [--world 3] [--tokens 64] [--quantize none]
    python benchmarks/tp_agreement.py layers [--world 3]   # per layer: N ranks, and one process nudged

`layers` reads one text at world N and in one process, and once more in one process with its first block's output
multiplied by 1 + 3e-7 x noise (the size of N ranks' difference there): if the nudged process parts from itself
as far as N ranks part from it, the cause is the path's sensitivity to last-bit differences, not the ranks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fire
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "I believe the meaning of life is"


def worker(out: str, tokens: int, forced: list[int] | None = None, quantize: str = "auto") -> None:
    """Under torchrun: greedy tokens, then the logits of reading `forced` (ids; None: its own) back; rank 0 saves
    them."""
    sys.path.insert(0, str(ROOT))
    from llama_dist import Llama

    llama = Llama.build("smollm2", max_seq_len=256, max_batch_size=1, backend="gloo", quantize=quantize,
                        dtype="float32")
    prompt = llama.tokenizer.encode(PROMPT, bos=True, eos=False)
    generated, _ = llama.generate([prompt], tokens, temperature=0)
    ids = prompt + list(forced if forced is not None else generated[0])
    logits = llama.runner.forward(torch.tensor([ids]), 0)[0]
    if llama.is_driver:
        torch.save({"prompt": len(prompt), "generated": generated[0], "logits": logits}, out)
    os._exit(0)  # (Gloo's teardown is not needed for a measurement)


def layer_worker(out: str, quantize: str = "auto", nudge: float = 0.0) -> None:
    """Under torchrun: every block's output and the logits of one prompt pass over a longer text; rank 0 saves them."""
    sys.path.insert(0, str(ROOT))
    from llama_dist import Llama

    llama = Llama.build("smollm2", max_seq_len=256, max_batch_size=1, backend="gloo", quantize=quantize,
                        dtype="float32")
    noise = torch.Generator().manual_seed(1)
    outputs = {}

    def keep(name: str):
        def hook(module, inputs, output):
            if name == "0" and nudge:
                output = output * (1 + nudge * torch.randn(output.shape, generator=noise))
            outputs[name] = output.clone()
            return output
        return hook

    for name, block in llama.model.layers.items():
        block.register_forward_hook(keep(name))
    ids = llama.tokenizer.encode(PROMPT + " to find your gift. The purpose of life is to give it away.", bos=True,
                                 eos=False)
    outputs["logits"] = llama.runner.forward(torch.tensor([ids]), 0)[0]
    if llama.is_driver:
        torch.save(outputs, out)
    os._exit(0)


def layers(world: int = 3, quantize: str = "auto", nudge: float = 3e-7) -> dict:
    """Per block output (and the logits): the largest and median difference from one process, at `world` ranks
    and in one process nudged by `nudge`."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, n, extra in (("one", 1, 0.0), ("ranks", world, 0.0), ("nudged", 1, nudge)):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), __file__,
                   "layer_worker", "--out", f"{tmp}/{name}.pt", "--quantize", quantize, "--nudge", str(extra)]
            subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL)
            runs[name] = torch.load(f"{tmp}/{name}.pt")
    rows = {}
    for key in runs["one"]:
        row = {}
        for other in ("ranks", "nudged"):
            d = (runs["one"][key] - runs[other][key]).abs()
            row[other] = {"max": round(d.max().item(), 6), "median": float(f"{d.median().item():.3g}")}
        rows[key] = row
    result = {"world": world, "quantize": quantize, "nudge": nudge, "differences_from_one_process": rows}
    print(json.dumps(result, indent=1))
    return result


def run(world: int, out: str, tokens: int, quantize: str, forced: list[int] | None = None) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), __file__, "worker",
           "--out", out, "--tokens", str(tokens), "--quantize", quantize]
    if forced is not None:
        cmd += ["--forced", json.dumps(forced)]  # (fire reads it back as a list)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    return torch.load(out)


def main(world: int = 3, tokens: int = 64, quantize: str = "auto") -> dict:
    """quantize: "auto" (the file's Q4_1/Q8_0 blocks, the default path) or "none" (dense fp32)."""
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, f"{tmp}/one.pt", tokens, quantize)
        many = run(world, f"{tmp}/many.pt", tokens, quantize, forced=one["generated"])
    start = one["prompt"] - 1  # the logits that choose the first generated token
    chose, forced = one["logits"][start:start + tokens], many["logits"][start:start + tokens]
    top2 = chose.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    diff = (chose - forced).abs().max(dim=-1).values.tolist()
    parts = next((i for i, (a, b) in enumerate(zip(one["generated"], many["generated"])) if a != b), None)
    flips = [i for i in range(len(margin)) if chose[i].argmax() != forced[i].argmax()]
    result = {"world": world, "quantize": quantize, "tokens": tokens, "first_different_token": parts,
              "largest_logit_difference": max(diff), "median_logit_difference": sorted(diff)[len(diff) // 2],
              "positions_where_the_choice_flips": flips,
              "margin_there": [margin[i] for i in flips],
              "margin_at_first_difference": None if parts is None else margin[parts],
              "smallest_margin": min(margin),
              "flips_only_below_the_difference": all(margin[i] <= diff[i] for i in flips)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    commands = {"main": main, "worker": worker, "layers": layers, "layer_worker": layer_worker}
    fire.Fire(commands) if sys.argv[1:2] and sys.argv[1] in commands else fire.Fire(main)
