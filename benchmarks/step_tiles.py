"""Which one-row tile runs the graphed decode step fastest, matrix by matrix; writes them as a tile table.

The tuner times each tile alone (kernels/tuning.streamed_time), which cannot see how a kernel overlaps its
neighbours in the step (PDL): for 7B int4's wo on an H200 it ranked within noise two tiles that run the step 3%
apart (RESULTS.md, 31st session). This times the step itself, batch 1 through `bench` in a process per arm, with
the table as LLAMA_DIST_TILES: first everything tuned (an empty table), then for each matrix of --kernel the
--top tiles the tuner timed next best (Triton's cache keeps its timings), alternated --rounds times with the best
table so far; a tile replaces the best only if its median beats the best's by --margin. Tables for a GPU model
live in llama_dist/kernels/tiles/<GPU>.json (the tuner reads them first).

    python benchmarks/step_tiles.py --config llama-2-7b --quantize int4 --out tiles.json
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist.kernels import gemv_triton  # noqa: E402,F401  (defines the one-row tuners)
from llama_dist.kernels.tuning import Table, disk_timings  # noqa: E402


def step_tok_s(table: Table, config: str, quantize: str, steps: int) -> tuple[float, Table]:
    """Batch-1 tokens/s of the graphed step with these tiles (bench in a process of its own, its JSON written into
    a fresh folder), and the tiles its tuners took."""
    with tempfile.TemporaryDirectory() as out:
        tiles = Path(out, "tiles.json")
        tiles.write_text(json.dumps(table))
        run = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_decode.py")), "--config", config,
                              "--quantize", quantize, "--batches", "(1,)", "--steps", str(steps), "--prefill", "16",
                              "--hf", "False", "--out", out], env={**os.environ, "LLAMA_DIST_TILES": str(tiles)},
                             capture_output=True, text=True)
        files = list(Path(out).glob("bench_*.json"))
        if run.returncode or not files:
            raise RuntimeError(f"bench failed ({run.returncode}): {run.stderr[-2000:]}")
        result = json.loads(files[0].read_text())
    return result["decode_b1_tok_s"], result.get("tiles", {})


def main(config: str = "llama-2-7b", quantize: str = "int4", kernel: str = "gemv_int4", top: int = 1,
         rounds: int = 2, margin: float = 0.005, steps: int = 128, out: str = "tiles.json") -> None:
    tuned_rate, tuned = step_tok_s({}, config, quantize, steps)
    print(json.dumps({"arm": "tuned", "tok_s": round(tuned_rate, 1)}), flush=True)
    if kernel not in tuned:
        raise SystemExit(f"no {kernel} tiles taken (picked: {sorted(tuned)}): a GPU run of --quantize {quantize}?")
    best = {kernel: dict(tuned[kernel])}
    for key, taken in tuned[kernel].items():
        others = [fields for fields, _ in disk_timings(kernel, key) if fields != taken][:top]
        if not others:
            print(json.dumps({"key": key, "no timings in Triton's cache": True}), flush=True)
            continue
        arms = [dict(best[kernel])] + [{**best[kernel], key: fields} for fields in others]
        rates: list[list[float]] = [[] for _ in arms]
        for _ in range(rounds):
            for arm, samples in zip(arms, rates):
                samples.append(step_tok_s({kernel: arm}, config, quantize, steps)[0])
        medians = [statistics.median(r) for r in rates]
        winner = max(range(len(arms)), key=medians.__getitem__)
        if medians[winner] > medians[0] * (1 + margin):
            best[kernel] = arms[winner]
        print(json.dumps({"key": key, "tiles": [a[key] for a in arms], "tok_s": rates, "kept": best[kernel][key]}),
              flush=True)
        Path(out).write_text(json.dumps(best, indent=1) + "\n")  # (so far: a call cut short keeps what it found)


if __name__ == "__main__":
    fire.Fire(main)
