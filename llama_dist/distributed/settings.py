"""Our own environment switches, read in this one place (once, when a run starts), never per call.

    LLAMA_DIST_TIMEOUT            seconds bounding the rendezvous and every collective (default 300)
    LLAMA_DIST_HEARTBEAT_TIMEOUT  seconds a rank on another machine may stay silent before it is dead (10)
    LLAMA_DIST_GEMV=0             CUDA: no Triton one-row matmul kernel (norm/SwiGLU/residual folded in)
    LLAMA_DIST_ATTENTION=0        CUDA: no Triton decode-attention kernel (SDPA instead)
    LLAMA_DIST_PDL=0              CUDA sm_90+: our decode kernels launched plainly, not as programmatic dependents
                                  (each starting while the one before it ends)
    LLAMA_DIST_SYMM_MEM=0         CUDA, tensor-parallel: all-reduces through NCCL, not in-kernel sums through peer
                                  slots (one row) or a symmetric-memory one-shot (compiled graphs)
    LLAMA_DIST_TILES=FILE         CUDA: the tiles to use, a table as benchmarks/step_tiles.py writes (default:
                                  llama_dist/kernels/tiles/<GPU>.json, if any); a file holding {} times them all
    LLAMA_DIST_CPU_KERNELS=0|avx2|scalar  CPUs: no C++ kernels, or their AVX2 build (not AVX-512 VNNI), or their
                                  portable (plain C++) build

The switches exist for comparisons (A/B runs, tests); the defaults are the fast choices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Settings:
    timeout_s: float = 300.0
    heartbeat_timeout_s: float = 10.0
    gemv: bool = True
    attention: bool = True
    pdl: bool = True
    symm_mem: bool = True
    tiles: str = ""  # a tile table's path; "" for the one shipped for the GPU
    cpu_kernels: str = "auto"  # "auto" (the CPU's best: AVX-512 VNNI, AVX2), "avx2", "scalar" or "off"


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The switches as the environment sets them now (os.environ unless given)."""
    env = os.environ if environ is None else environ

    def on(name: str) -> bool:
        return env.get(name, "1") != "0"

    cpu = env.get("LLAMA_DIST_CPU_KERNELS", "")
    return Settings(timeout_s=float(env.get("LLAMA_DIST_TIMEOUT", 300)),
                    heartbeat_timeout_s=float(env.get("LLAMA_DIST_HEARTBEAT_TIMEOUT", 10)),
                    gemv=on("LLAMA_DIST_GEMV"), attention=on("LLAMA_DIST_ATTENTION"), pdl=on("LLAMA_DIST_PDL"),
                    symm_mem=on("LLAMA_DIST_SYMM_MEM"), tiles=env.get("LLAMA_DIST_TILES", ""),
                    cpu_kernels={"0": "off", "avx2": "avx2", "scalar": "scalar"}.get(cpu, "auto"))
