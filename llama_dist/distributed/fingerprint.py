"""Ranks must run the same code on the same checkpoint: compare a fingerprint at start-up."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from .context import ParallelContext

PACKAGE_DIR = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    h = hashlib.sha256()
    for f in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(f.relative_to(PACKAGE_DIR)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def checkpoint_fingerprint(path: Path, format: str, params: dict) -> str:
    """Format, shape and file names/sizes: cheap, and independent of where each host mounted the files."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    summary = [format, params, [(f.name, f.stat().st_size) for f in files]]
    return hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_on_all_ranks(ctx: ParallelContext, value: str, what: str) -> None:
    """Every rank raises, naming the ranks that differ from rank 0, so none is left waiting."""
    if ctx.world_size == 1:
        return
    reference = ctx.comm.broadcast_object(value)
    differs = torch.zeros(ctx.world_size, device=ctx.device)
    differs[ctx.rank] = float(value != reference)
    ranks = ctx.comm.all_reduce(differs).nonzero().flatten().tolist()
    if ranks:
        raise RuntimeError(f"Rank(s) {', '.join(map(str, ranks))} run a different {what} than rank 0. Every rank must "
                           "run the same llama-dist version on the same checkpoint; sync the code and files on "
                           "every host.")
