"""Parallel scaling on one host: `llama-dist bench` at several TP x PP layouts, one after another.

    python benchmarks/parallel_scaling.py --config llama-2-7b --layouts 1,2,4 [--batches 1]   # GPUs, TP
    python benchmarks/parallel_scaling.py --config small-bench --layouts 1,2,1x2 --batches 8  # CPU, PP too
    python benchmarks/parallel_scaling.py --model SmolLM2.gguf --layouts 1,1x2 --batches 8 --compile False

A layout is TP or TPxPP (ranks = TP x PP). Prints decode tokens/s per layout, the speed-up over the
first, each run's fraction of its own bandwidth ceiling, and whether batch-1 greedy tokens are
identical across layouts (the same random weights in every layout: RandomSource draws each full
tensor from a seed, then slices it). Extra environment for every run: --env "LLAMA_DIST_SYMM_MEM=0";
for one run, after its layout: --layouts 1,2,2@LLAMA_DIST_SYMM_MEM=0 (an A/B in one call).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GPU_DECODE = Path(__file__).resolve().parent / "gpu_decode.py"


def run_bench(layout: str, args: argparse.Namespace) -> dict:
    """One torchrun job of TP x PP ranks; its rank 0 writes the bench JSON into a fresh folder. A job past
    --timeout is killed; if its JSON was written (the work done, the exit stuck) it still counts."""
    with tempfile.TemporaryDirectory() as out:
        shape, *own_env = layout.split("@")
        env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env + own_env))
        tp, pp = (int(n) for n in (shape.split("x") + ["1"])[:2])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp * pp), str(GPU_DECODE),
               "--config", args.config, "--batches", f"({args.batches},)", "--steps", str(args.steps),
               "--hf", "False", "--quantize", args.quantize, "--pp", str(pp), "--compile", str(args.compile), "--out", out]
        cmd += ["--model", args.model] if args.model else []
        log = Path(os.environ.get("OUT", out), f"{layout.replace('=', '-')}_{Path(args.config).stem}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = "timeout"
        files = list(Path(out).glob("bench_*.json"))
        text = log.read_text()
        if not files:
            errors = [line for line in text.splitlines() if "Error" in line or "error:" in line]
            return {"layout": layout, "error": f"exit {code}", "log_errors": errors[-20:]}
        # how the ranks left: seconds from rank 0's result to the last exit, and whether any rank complained
        quiet = "Traceback" not in text and "destroy_process_group" not in text
        return {"layout": layout, "exit": code, "exit_after_s": round(time.time() - files[0].stat().st_mtime, 1),
                "exit_quiet": quiet, **json.loads(files[0].read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-2-7b")
    p.add_argument("--model", help="a checkpoint to run instead of the config's random weights")
    p.add_argument("--layouts", default="1,2,4", help="comma-separated TP or TPxPP, the first is the baseline")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--quantize", default="none")
    p.add_argument("--compile", default="True", help="compile the decode step (pipelined runs stay eager)")
    p.add_argument("--env", nargs="*", default=[], help="KEY=VALUE pairs for every run")
    p.add_argument("--timeout", type=float, default=480, help="seconds per run (a hang must not eat the machine)")
    args = p.parse_args()
    runs = []
    for layout in args.layouts.split(","):
        runs.append(run_bench(layout, args))
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("greedy_b1", "top2_b1")}), flush=True)
    base = runs[0]
    summary = {"config": args.config, "quantize": args.quantize, "env": args.env, "runs": []}
    for r in runs:
        row = {"layout": r["layout"]}
        if "error" in r:
            row.update((k, r[k]) for k in ("error", "log_errors"))
        else:
            row.update(exit=r["exit"], exit_after_s=r["exit_after_s"], exit_quiet=r["exit_quiet"], device=r["device"],
                       ceiling_b1_tok_s=r["ceiling_tok_s"], load_s=r["load_s"],
                       prefill_tok_s=r["prefill_tok_s"], prefill_forward_tok_s=r.get("prefill_forward_tok_s"),
                       weight_bytes_per_rank=r["weight_bytes_per_rank"])
            for b in args.batches.split(","):
                key = f"decode_b{b}_tok_s"
                row[key] = r[key]
                if key in base:
                    row[f"b{b}_speedup_vs_{base['layout']}"] = r[key] / base[key]
            if "greedy_b1" in r and "greedy_b1" in base:
                row["greedy_b1_same_as_baseline"] = r["greedy_b1"] == base["greedy_b1"]
                first = next((i for i, (a, b) in enumerate(zip(r["greedy_b1"], base["greedy_b1"])) if a != b), None)
                row["greedy_b1_first_difference"] = first
                if first is not None and base.get("top2_b1"):
                    # near-tie: the baseline's top two within two bf16 steps (1/128 of the logit each)
                    top, second = base["top2_b1"][first]
                    row["baseline_top2_gap_at_first_difference"] = top - second
                    row["first_difference_is_near_tie"] = top - second <= 2 * abs(top) / 128
            if "b1_fraction_of_ceiling" in r:
                row["b1_fraction_of_ceiling"] = r["b1_fraction_of_ceiling"]
        summary["runs"].append(row)
    print(json.dumps(summary, indent=1))
    if os.environ.get("OUT"):
        name = f"scaling_{Path(args.config).stem}_{args.quantize}{'_' + '_'.join(args.env) if args.env else ''}.json"
        Path(os.environ["OUT"], name).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
