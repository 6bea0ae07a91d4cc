"""init_distributed(): one call that turns "however we were launched" into a ParallelContext."""
from __future__ import annotations

import atexit
import os
import sys
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .comm import Communicator, TorchCommunicator
from .env import LaunchEnv, detect_launch
from .layout import check_layout
from .monitor import FailureMonitor
from .rendezvous import rendezvous
from .settings import read_settings

BACKENDS = ("auto", "nccl", "gloo", "mpi")

_GRAPHS: weakref.WeakSet = weakref.WeakSet()  # CUDA graphs alive, freed at shutdown before the process group


def free_at_shutdown(graph: torch.cuda.CUDAGraph) -> None:
    """A captured CUDA graph that may hold NCCL kernels: shutdown frees it before destroying the process group,
    which otherwise waits for ever on the communicators the graph keeps busy (pytorch#115388)."""
    _GRAPHS.add(graph)


@dataclass
class ParallelContext:
    """Everything a rank needs to know about its place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "none" for a single process
    device: torch.device
    comm: Communicator  # the whole job: the driver's broadcasts, pipeline sends
    monitor: FailureMonitor | None = None
    failed: bool = field(default=False, repr=False)
    pp_size: int = 1  # pipeline stages; stage = rank // tp_size
    tp_comm: Communicator | None = None  # this rank's stage: the model's all-reduces (None: the whole job)

    def __post_init__(self):
        self.tp_comm = self.tp_comm or self.comm

    @property
    def is_driver(self) -> bool:
        """Rank 0 owns all I/O: stdin, files, sockets, printing."""
        return self.rank == 0

    @property
    def tp_size(self) -> int:
        return self.tp_comm.world_size

    @property
    def tp_rank(self) -> int:
        return self.tp_comm.rank

    def shutdown(self) -> None:
        """Leave together: mark a clean exit, wait for every rank, then close the process group.

        After a failure nothing collective is safe any more, so the process just exits non-zero.
        """
        if self.monitor is not None:
            self.monitor.stop(clean=not self.failed)
            self.monitor = None
        if self.failed:
            sys.stderr.flush()
            os._exit(1)
        if dist.is_initialized():
            self.comm.barrier()
            if self.device.type == "cuda":  # CUDA graphs that captured NCCL kernels keep its communicators
                torch.cuda.synchronize(self.device)  # busy: destroying them first would hang (pytorch#115388)
                for graph in list(_GRAPHS):
                    graph.reset()
                # only where graphs were compiled: importing inductor from an exit hook raises "can't register
                # atexit after shutdown"
                trees = sys.modules.get("torch._inductor.cudagraph_trees")
                if trees is not None:
                    trees.reset_cudagraph_trees()
            dist.destroy_process_group()

    def _install_exit_hooks(self) -> None:
        previous = sys.excepthook

        def report_and_print(exc_type, exc, tb):
            self.failed = True
            if self.monitor is not None:
                self.monitor.report_error(exc)
            previous(exc_type, exc, tb)

        sys.excepthook = report_and_print
        atexit.register(self.shutdown)


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
        raise RuntimeError("backend=nccl needs NVIDIA GPUs and a CUDA build of PyTorch, and this machine "
                           "or build has neither. Use backend gloo (CPUs, Macs) or auto.")
    if backend == "gloo" and not dist.is_gloo_available():
        raise RuntimeError("This PyTorch build has no Gloo backend. Use backend nccl on NVIDIA GPUs.")
    if backend == "mpi" and not dist.is_mpi_available():
        from .mpi import mpi4py_available

        if not mpi4py_available():
            raise RuntimeError("backend=mpi needs mpi4py (pip install 'llama-dist[mpi]'), and it is not "
                               "installed. Or use backend gloo, which also runs under mpirun.")
        return "mpi4py"
    return backend


def _set_cpu_threads(launch: LaunchEnv) -> None:
    """Ranks sharing a host share its cores; without this each would start one thread per core."""
    if "OMP_NUM_THREADS" not in os.environ and launch.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))


def init_distributed(backend: str = "auto", device: str | torch.device | None = None,
                     timeout_s: float | None = None, dead_after_s: float | None = None,
                     pp: int = 1) -> ParallelContext:
    """Detect the launcher, pick the device and backend, and bring the ranks together (if more than one).

    timeout_s bounds the rendezvous and every collective; a rank silent for dead_after_s is declared
    dead and every other rank exits non-zero naming it (defaults: LLAMA_DIST_TIMEOUT and
    LLAMA_DIST_HEARTBEAT_TIMEOUT, settings.py). pp: pipeline stages; the ranks of a stage
    (world / pp consecutive ranks) form its tensor-parallel group.
    """
    settings = read_settings()
    timeout_s = settings.timeout_s if timeout_s is None else timeout_s
    dead_after_s = settings.heartbeat_timeout_s if dead_after_s is None else dead_after_s
    launch = detect_launch()
    tp = check_layout(launch.world_size, pp)  # before any rendezvous
    ctx = _init_world(launch, backend, device, timeout_s, dead_after_s)
    return _split_stages(ctx, tp, pp, launch) if pp > 1 else ctx


def _split_stages(ctx: ParallelContext, tp: int, pp: int, launch: LaunchEnv) -> ParallelContext:
    """Give each pipeline stage its own tensor-parallel communicator (every rank joins every group's
    creation, in the same order, as torch.distributed requires)."""
    stage = ctx.rank // tp
    if launch.local_world_size > 1 and launch.local_world_size % tp and ctx.is_driver:
        print(f"llama-dist: warning: hosts run {launch.local_world_size} ranks each, so a tensor-parallel group "
              f"of {tp} spans hosts; choose pp so that world / pp divides the ranks per host.", flush=True)
    ctx.pp_size = pp
    if ctx.backend == "mpi4py":
        ctx.tp_comm = ctx.comm.split(stage)
        return ctx
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
    on_failure = ctx.monitor.await_verdict if ctx.monitor is not None else None
    ctx.tp_comm = TorchCommunicator(groups[stage], on_failure=on_failure) if tp > 1 else Communicator()
    return ctx


def _init_world(launch: LaunchEnv, backend: str, device: str | torch.device | None, timeout_s: float,
                dead_after_s: float) -> ParallelContext:
    device = torch.device(device) if device is not None else pick_device(launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size == 1:
        resolve_backend(backend, device)  # still refuse an impossible request
        return ParallelContext(0, 1, 0, "none", device, Communicator())
    backend = resolve_backend(backend, device)
    if device.type == "cpu":
        _set_cpu_threads(launch)
    if backend == "mpi4py":  # MPI itself aborts the whole job when a rank dies
        from .mpi import MpiCommunicator

        comm = MpiCommunicator()
        return ParallelContext(comm.rank, comm.world_size, launch.local_rank, backend, device, comm)
    if dist.is_initialized():
        return ParallelContext(launch.rank, launch.world_size, launch.local_rank, backend,
                               device, TorchCommunicator())
    if backend == "mpi":
        dist.init_process_group("mpi", timeout=timedelta(seconds=timeout_s))
        return ParallelContext(dist.get_rank(), dist.get_world_size(), launch.local_rank, backend, device,
                               TorchCommunicator())
    store = rendezvous(launch, timeout_s)
    dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(seconds=timeout_s))
    monitor = FailureMonitor(store, launch.rank, launch.world_size, dead_after_s=dead_after_s)
    ctx = ParallelContext(launch.rank, launch.world_size, launch.local_rank, backend, device,
                          TorchCommunicator(on_failure=monitor.await_verdict), monitor)
    ctx._install_exit_hooks()
    return ctx
