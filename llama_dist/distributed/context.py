"""init_distributed(): one call that turns "however we were launched" into a ParallelContext."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .comm import Communicator, TorchCommunicator
from .env import LaunchEnv, detect_launch

BACKENDS = ("auto", "nccl", "gloo", "mpi")
DEFAULT_TIMEOUT_S = float(os.environ.get("LLAMA_DIST_TIMEOUT", 300))


@dataclass
class ParallelContext:
    """Everything a rank needs to know about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str
    backend: str  # "none" for a single process
    device: torch.device
    comm: Communicator

    @property
    def is_driver(self) -> bool:
        """Rank 0 owns all I/O: stdin, files, sockets, printing."""
        return self.rank == 0


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend and refuse ones this PyTorch cannot run, naming the alternative."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise RuntimeError("--backend nccl needs NVIDIA GPUs and a CUDA build of PyTorch, and this machine "
                           "or build has neither. Use --backend gloo (CPUs, Macs) or --backend auto.")
    if backend == "gloo" and not dist.is_gloo_available():
        raise RuntimeError("This PyTorch build has no Gloo backend. Use --backend nccl on NVIDIA GPUs.")
    if backend == "mpi" and not dist.is_mpi_available():
        raise RuntimeError("--backend mpi needs a PyTorch built with MPI, and this one is not. "
                           "Use --backend gloo (works under mpirun too) or --backend nccl on GPUs.")
    return backend


def _ensure_rendezvous_address(launch: LaunchEnv) -> None:
    """torchrun exports MASTER_ADDR/PORT; under mpirun, share rank 0's host and a free port through MPI."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            f"Launched by {launch.launcher} with {launch.world_size} ranks but MASTER_ADDR/MASTER_PORT are not set. "
            "Export MASTER_ADDR=<rank 0's host> and MASTER_PORT=<free port> to every rank, "
            "or install mpi4py (pip install 'llama-dist[mpi]') to share them automatically.") from None
    address = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            address = (socket.gethostname(), s.getsockname()[1])
    host, port = MPI.COMM_WORLD.bcast(address, root=0)
    os.environ.setdefault("MASTER_ADDR", host)
    os.environ.setdefault("MASTER_PORT", str(port))


def _set_cpu_threads(launch: LaunchEnv) -> None:
    """Ranks sharing a host share its cores; without this each would start one thread per core."""
    if "OMP_NUM_THREADS" not in os.environ and launch.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))


def init_distributed(backend: str = "auto", device: str | torch.device | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext:
    """Detect the launcher, pick the device and backend, and start the process group (if more than one rank)."""
    launch = detect_launch()
    device = torch.device(device) if device is not None else pick_device(launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size == 1:
        resolve_backend(backend, device)  # still refuse an impossible request
        return ParallelContext(0, 1, 0, launch.launcher, "none", device, Communicator())
    backend = resolve_backend(backend, device)
    if device.type == "cpu":
        _set_cpu_threads(launch)
    if not dist.is_initialized():
        _ensure_rendezvous_address(launch)
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return ParallelContext(launch.rank, launch.world_size, launch.local_rank, launch.launcher,
                           backend, device, TorchCommunicator())
