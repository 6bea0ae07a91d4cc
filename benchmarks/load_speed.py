"""Loading speed: a Meta-format checkpoint from local disk onto the device, beside the speed of only reading
its files (the bound a loader can approach).

    python benchmarks/load_speed.py --config llama-2-7b --dir /tmp/ckpt-7b          # one GPU (issue 6)
    torchrun --nproc_per_node 2 benchmarks/load_speed.py --config llama-2-7b --dir /tmp/ckpt-7b   # TP=2
    python benchmarks/load_speed.py --config tiny-gqa --dir /tmp/ckpt-tiny --device cpu

Writes random bf16 weights in Meta's layout once (--mp shards; kept for later runs), then per repetition:
drops the page cache where it may (root on Linux; otherwise the JSON says the reads were warm), reads every
shard file to its end, drops the cache again, and times load_model onto the device (every rank reads only its
slice). Prints both speeds in GB/s of checkpoint bytes and our fraction of the plain read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist.checkpoint.config import LoadConfig  # noqa: E402
from llama_dist.checkpoint.loader import load_model, open_checkpoint  # noqa: E402
from llama_dist.checkpoint.meta import save_meta_checkpoint, shard_paths  # noqa: E402
from llama_dist.checkpoint.source import RandomSource  # noqa: E402
from llama_dist.distributed.context import init_distributed  # noqa: E402
from llama_dist.model.args import ModelArgs  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def drop_page_cache() -> bool:
    """Whether the kernel's page cache could be emptied (needs root on Linux), so the next read hits the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_files(paths: list[Path], chunk: int = 64 << 20) -> float:
    """Seconds to read the files to their ends, one after another."""
    buffer = bytearray(chunk)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-2-7b")
    p.add_argument("--dir", required=True, help="where the checkpoint is (written there first if missing)")
    p.add_argument("--mp", type=int, default=1, help="shards of the written checkpoint")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    ctx = init_distributed(device=a.device)
    ckpt = Path(a.dir)
    if ctx.is_driver and not (ckpt / "params.json").exists():
        args = ModelArgs.from_params_json(CONFIGS / f"{a.config}.json")
        t = time.perf_counter()
        save_meta_checkpoint(RandomSource(args, ctx.device), ckpt, mp=a.mp, dtype=torch.bfloat16)
        print(f"wrote {ckpt} in {time.perf_counter() - t:.1f} s", flush=True)
    ctx.comm.barrier()
    paths = shard_paths(ckpt)
    file_bytes = sum(path.stat().st_size for path in paths)
    reads, loads, cold = [], [], True
    for _ in range(a.reps):
        if ctx.is_driver:  # the plain read, on one rank: what a loader could approach
            cold &= drop_page_cache()
            reads.append(read_files(paths))
        ctx.comm.barrier()
        if ctx.is_driver:
            cold &= drop_page_cache()
        ctx.comm.barrier()
        start = time.perf_counter()
        model = load_model(open_checkpoint(ckpt), ctx, LoadConfig(dtype="bfloat16", n_ctx=256, max_batch_size=1),
                           progress=False)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        ctx.comm.barrier()
        loads.append(time.perf_counter() - start)
        del model
    if ctx.is_driver:
        read_s, load_s = min(reads), min(loads)
        result = {"config": a.config, "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
                  else "cpu", "world_size": ctx.world_size, "checkpoint_shards": len(paths), "file_bytes": file_bytes,
                  "page_cache_dropped": cold, "read_gbs": file_bytes / read_s / 1e9,
                  "load_to_device_gbs": file_bytes / load_s / 1e9, "read_s": read_s, "load_s": load_s,
                  "load_fraction_of_read_speed": read_s / load_s}
        print(json.dumps(result, indent=1))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"load_speed_{a.config}_tp{ctx.world_size}.json").write_text(json.dumps(result))
    ctx.shutdown()


if __name__ == "__main__":
    main()
