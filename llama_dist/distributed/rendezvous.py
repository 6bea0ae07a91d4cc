"""Bringing ranks together: where rank 0 listens, and who has arrived.

torchrun exports MASTER_ADDR/MASTER_PORT; under mpirun they are shared through mpi4py, under
Slurm derived from the node list. We host our own TCPStore so that a rendezvous that times out
can name the ranks that never arrived, and so the failure monitor can share heartbeats.
"""
from __future__ import annotations

import os
import re
import socket
import time
from datetime import timedelta

import torch.distributed as dist

from .env import LaunchEnv


class RendezvousError(RuntimeError):
    pass


def first_slurm_host(nodelist: str) -> str:
    """'node[003-005,7],gpu1' -> 'node003' (Slurm's compressed host list, first entry)."""
    m = re.match(r"([^,\[]+)(?:\[([0-9]+))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def master_address(launch: LaunchEnv) -> tuple[str, int]:
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if launch.launcher == "slurm" and "SLURM_JOB_NODELIST" in os.environ:
        port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000  # same on every rank, differs per job
        return first_slurm_host(os.environ["SLURM_JOB_NODELIST"]), port
    try:
        from mpi4py import MPI
    except ImportError:
        raise RendezvousError(
            f"Launched by {launch.launcher} with {launch.world_size} ranks but MASTER_ADDR/MASTER_PORT are not "
            "set. Export MASTER_ADDR=<rank 0's host> and MASTER_PORT=<free port> to every rank, or install "
            "mpi4py (pip install 'llama-dist[mpi]') to share them automatically.") from None
    address = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            address = (os.environ.get("MASTER_ADDR", socket.gethostname()), s.getsockname()[1])
    return MPI.COMM_WORLD.bcast(address, root=0)


def rendezvous(launch: LaunchEnv, timeout_s: float) -> dist.TCPStore:
    """Connect to rank 0's store and wait until every rank has checked in, naming any that do not."""
    host, port = master_address(launch)
    try:
        store = dist.TCPStore(host, port, world_size=None, is_master=launch.rank == 0,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as e:
        raise RendezvousError(f"rank {launch.rank} could not reach rank 0's rendezvous at {host}:{port} within "
                              f"{timeout_s:.0f} s ({e}). Check that rank 0 is running, that MASTER_ADDR is an "
                              "address this host can reach, and the firewall.") from None
    store.set(f"arrived/{launch.rank}", socket.gethostname())
    keys = [f"arrived/{r}" for r in range(launch.world_size)]
    deadline = time.monotonic() + timeout_s
    missing = list(range(launch.world_size))
    while True:
        try:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
        except Exception:  # rank 0 gave up (same deadline) and took its store down: report what we last saw
            deadline = 0
        if not missing:
            return store
        if time.monotonic() > deadline:
            raise RendezvousError(
                f"Rendezvous at {host}:{port} timed out after {timeout_s:.0f} s: "
                f"{launch.world_size - len(missing)} of {launch.world_size} ranks arrived; missing rank(s) "
                f"{', '.join(map(str, missing))}. Start every rank (the world size is {launch.world_size}) "
                "or lower it.")
        time.sleep(0.1)
