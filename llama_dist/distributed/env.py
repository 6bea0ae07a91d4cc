"""Who launched us: read rank, world size and local rank from the launcher's environment.

torchrun, Open MPI, MPICH/Intel MPI (PMI) and Slurm each export their own variables; a plain
`python script.py` exports none and runs as a single process with no process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "torchrun" | "openmpi" | "pmi" | "slurm" | "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


# launcher: (rank var, world var, local-rank vars, local-size vars), each list in order of preference
_LAUNCHERS = {
    "torchrun": ("RANK", "WORLD_SIZE", ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",)),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    "pmi": ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "MPI_LOCAL_RANK"),
            ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", ("SLURM_LOCALID",), ("SLURM_NTASKS_PER_NODE",)),
}


def detect_launch(environ: dict[str, str] | None = None) -> LaunchEnv:
    """The first launcher whose rank and world-size variables are both set wins."""
    env = os.environ if environ is None else environ

    def first_int(names: tuple[str, ...], default: int) -> int:
        for name in names:
            value = env.get(name, "").split("(")[0]  # Slurm writes e.g. "2(x3)"
            if value.isdigit():
                return int(value)
        return default

    for launcher, (rank_var, world_var, local_vars, local_size_vars) in _LAUNCHERS.items():
        if rank_var in env and world_var in env:
            rank, world = int(env[rank_var]), int(env[world_var])
            if not 0 <= rank < world:
                raise RuntimeError(f"{launcher}: {rank_var}={rank} is outside 0..{world - 1} ({world_var}={world}).")
            return LaunchEnv(launcher, rank, world, first_int(local_vars, 0), first_int(local_size_vars, 1))
    return LaunchEnv("none", 0, 1, 0, 1)
