"""Communicator: the collectives and point-to-point sends the model and the driver need, behind one interface.

The model never calls torch.distributed directly, so a single process runs with no process
group at all, and other transports (mpi4py) slot in by implementing the same methods.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import peer_memory
from .peer_memory import PeerSlots

_ONE_SHOT_BUFFERS: dict[str, torch.Tensor] = {}  # group name -> its symmetric-memory staging buffer


@torch.library.custom_op("llama_dist::one_shot_all_reduce", mutates_args=())
def one_shot_all_reduce(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum over the group in one kernel: copy into this rank's symmetric buffer, read every peer's.

    An opaque op to the compiler on purpose: the staging buffer is allocated once outside any graph,
    so a CUDA graph replays it at a fixed address (inductor's own lowering would allocate it inside
    the graph's memory pool)."""
    staging = _ONE_SHOT_BUFFERS[group_name][:tensor.numel()].view(tensor.shape)
    return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, tensor.contiguous(), "sum", group_name)


@one_shot_all_reduce.register_fake
def _(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(tensor)


class Communicator:
    """One process: every collective is the identity."""

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum across ranks, in place; returns the tensor."""
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's tensor along `dim`, in rank order."""
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite the tensor with `src`'s, in place; returns the tensor."""
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Any picklable object from `src` to every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def send(self, tensor: torch.Tensor, dst: int) -> Any:
        """Start sending to rank `dst`; returns a handle whose wait() says the tensor may change again."""
        raise RuntimeError("A single process has no other rank to send to.")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Fill the tensor with what rank `src` sends; returns it."""
        raise RuntimeError("A single process has no other rank to receive from.")

    def enable_fast_all_reduce(self, numel: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Let compiled graphs run all-reduces of up to `numel` elements by a faster route, where the
        transport has one."""
        return False

    def peer_slots(self, sites: int, dim: int, dtype: torch.dtype, device: torch.device) -> PeerSlots | None:
        """Slots the ranks write each other's partial sums into (peer_memory.py), where the transport has
        them; None elsewhere. Every rank calls this at once."""
        return None


class TorchCommunicator(Communicator):
    """torch.distributed process group: NCCL, Gloo, or PyTorch's native MPI."""

    def __init__(self, group: dist.ProcessGroup | None = None,
                 on_failure: Callable[[BaseException], None] | None = None):
        """on_failure: called when a collective raises, before the error propagates (the failure
        monitor uses it to name the rank that died instead of blaming this one)."""
        self.group, self.on_failure = group, on_failure
        self._one_shot: tuple[int, torch.dtype] | None = None  # see enable_fast_all_reduce
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            if self.on_failure is not None:
                self.on_failure(e)
            raise

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traceable form: no graph break inside a compiled decode step
            group = self.group or dist.group.WORLD
            if self._one_shot and tensor.numel() <= self._one_shot[0] and tensor.dtype == self._one_shot[1]:
                return one_shot_all_reduce(tensor, group.group_name)
            return funcol.all_reduce(tensor, "sum", group)
        with self._guard():
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if torch.compiler.is_compiling():
            gathered = funcol.all_gather_tensor(tensor.contiguous(), 0, self.group or dist.group.WORLD)
            return torch.cat(gathered.chunk(self.world_size, dim=0), dim=dim)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with self._guard():
            dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        with self._guard():
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        with self._guard():
            dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        with self._guard():
            dist.barrier(group=self.group)

    def send(self, tensor: torch.Tensor, dst: int) -> Any:
        with self._guard():
            return dist.isend(tensor, dst, group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        with self._guard():
            dist.recv(tensor, src, group=self.group)
        return tensor

    def enable_fast_all_reduce(self, numel: int, dtype: torch.dtype, device: torch.device) -> bool:
        """NCCL on GPUs: compiled graphs run all-reduces of up to `numel` elements of `dtype` as
        one_shot_all_reduce (no multicast involved): a few microseconds instead of NCCL's launch and
        stream hand-off, twice per layer. Checked once here (whether to ask is the kernel choice's)."""
        group = self.group or dist.group.WORLD
        if device.type != "cuda" or dist.get_backend(group) != "nccl":
            return False
        try:
            import torch.distributed._symmetric_memory as symm_mem

            symm_mem.enable_symm_mem_for_group(group.group_name)
            buffer = symm_mem.empty(numel, dtype=dtype, device=device)
            symm_mem.rendezvous(buffer, group.group_name)
            _ONE_SHOT_BUFFERS[group.group_name] = buffer
            total = one_shot_all_reduce(torch.ones(min(numel, 1024), dtype=dtype, device=device), group.group_name)
            if not bool((total == self.world_size).all()):
                raise RuntimeError(f"it summed to {total[0].item()}, not {self.world_size}")
        except Exception as e:  # old PyTorch, no peer access: NCCL still works
            _ONE_SHOT_BUFFERS.pop(group.group_name, None)
            if self.rank == 0:
                print(f"llama-dist: one-shot all-reduce unavailable ({e}); using NCCL's", flush=True)
            return False
        self._one_shot = (numel, dtype)
        return True

    def peer_slots(self, sites: int, dim: int, dtype: torch.dtype, device: torch.device) -> PeerSlots | None:
        """NCCL on GPUs of one host with symmetric memory. The ranks agree before anyone uses them: a rank
        reading slots that another never writes would wait for ever."""
        group = self.group or dist.group.WORLD
        if device.type != "cuda" or dist.get_backend(group) != "nccl":
            return None
        try:
            peer = peer_memory.allocate(group.group_name, self.rank, self.world_size, sites, dim, dtype, device)
        except Exception as e:  # old PyTorch, GPUs without peer access
            peer = None
            if self.rank == 0:
                print(f"llama-dist: peer slots unavailable ({e}); all-reducing between kernels", flush=True)
        everyone = torch.tensor([peer is not None], dtype=torch.int32, device=device)
        with self._guard():
            dist.all_reduce(everyone, dist.ReduceOp.MIN, group=self.group)  # also the barrier after zeroing
        return peer if bool(everyone.item()) else None
