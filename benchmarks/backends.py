"""Gloo vs MPI (mpi4py) on CPU: all-reduce latency at decode-step sizes, and TP=2 per-token latency.

    mpirun --allow-run-as-root -np 2 python benchmarks/backends.py [--config configs/small-bench.json]

Both backends live in the same mpirun job (Gloo bootstraps its rendezvous through MPI), so the
figures come from the same run on the same ranks.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_dist.bench import decode_tok_s  # noqa: E402
from llama_dist.checkpoint.config import LoadConfig  # noqa: E402
from llama_dist.checkpoint.loader import open_checkpoint  # noqa: E402
from llama_dist.checkpoint.meta import save_meta_checkpoint  # noqa: E402
from llama_dist.checkpoint.source import StateDictSource  # noqa: E402
from llama_dist.distributed.context import init_distributed  # noqa: E402
from llama_dist.generation.llama import load_runner  # noqa: E402
from llama_dist.distributed.mpi import MpiCommunicator  # noqa: E402
from llama_dist.model.args import ModelArgs  # noqa: E402
from tests.helpers import random_state_dict  # noqa: E402


def allreduce_us(comm, numel: int, iters: int = 300) -> float:
    t = torch.randn(numel)
    for _ in range(20):
        comm.all_reduce(t)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        comm.all_reduce(t)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def token_ms(ctx, ckpt: str, tokens: int = 48) -> float:
    runner = load_runner(open_checkpoint(ckpt), ctx, LoadConfig(dtype="float32", n_ctx=128, max_batch_size=1),
                         progress=False)
    return 1e3 / decode_tok_s(runner, ctx, batch=1, steps=tokens)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "small-bench.json"))
    a = p.parse_args()
    gloo = init_distributed("gloo")
    mpi = replace(gloo, comm=MpiCommunicator(), backend="mpi4py", monitor=None)
    args = ModelArgs.from_params_json(a.config)
    sizes = {"1 x dim (batch-1 decode)": args.dim, "8 x dim (batch-8 decode)": 8 * args.dim,
             "1 x 4096 (7B batch-1)": 4096, "32 x 4096 (7B batch-32)": 32 * 4096}
    rows = [(name, allreduce_us(gloo.comm, n), allreduce_us(mpi.comm, n)) for name, n in sizes.items()]
    ckpt = gloo.comm.broadcast_object(tempfile.mkdtemp() if gloo.is_driver else None)
    if gloo.is_driver:
        save_meta_checkpoint(StateDictSource(args, random_state_dict(args)), ckpt)
    gloo.comm.barrier()
    per_token = {"gloo": token_ms(gloo, ckpt), "mpi4py": token_ms(mpi, ckpt)}
    if gloo.is_driver:
        print(f"{gloo.world_size} ranks, CPU. all-reduce of fp32 (median of 300):")
        for name, g, m in rows:
            print(f"  {name:28s} gloo {g:8.1f} us   mpi4py {m:8.1f} us   (mpi/gloo {m / g:.2f})")
        print(f"TP={gloo.world_size} decode, {Path(a.config).name}: gloo {per_token['gloo']:.2f} ms/token, "
              f"mpi4py {per_token['mpi4py']:.2f} ms/token ({2 * args.n_layers + 2} collectives per token)")


if __name__ == "__main__":
    main()
