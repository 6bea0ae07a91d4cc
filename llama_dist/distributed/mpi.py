"""Communicator over mpi4py, for clusters with MPI but no usable NCCL/Gloo networking.

CPU tensors go to MPI zero-copy through numpy views. CUDA tensors go directly when the MPI
library is CUDA-aware, else are staged through host memory. bf16 has no MPI type: it is
summed as fp32 (a copy), which is also more accurate.
"""
from __future__ import annotations

from typing import Any

import torch

from .comm import Communicator


def cuda_aware(MPI) -> bool:
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query else False
    except Exception:
        return False


class MpiCommunicator(Communicator):
    def __init__(self, comm: Any = None):
        """comm: an mpi4py communicator (a tensor-parallel group); default the whole job."""
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm or MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.cuda_aware = cuda_aware(MPI)

    def _buffer(self, tensor: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(MPI buffer, tensor it views): the tensor itself where MPI can read it, else a host/fp32 copy."""
        staged = tensor
        if tensor.dtype == torch.bfloat16:
            staged = staged.float()
        if staged.is_cuda and not self.cuda_aware:
            staged = staged.cpu()
        staged = staged.contiguous()
        return (staged if staged.is_cuda else staged.numpy()), staged

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        buf, staged = self._buffer(tensor)
        if staged.is_cuda:
            torch.cuda.current_stream().synchronize()
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        if staged.data_ptr() != tensor.data_ptr():
            tensor.copy_(staged)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        send, staged = self._buffer(tensor)
        out = torch.empty((self.world_size, *staged.shape), dtype=staged.dtype, device=staged.device)
        recv = out if out.is_cuda else out.numpy()
        if staged.is_cuda:
            torch.cuda.current_stream().synchronize()
        self.comm.Allgather(send, recv)
        gathered = torch.cat(list(out.unbind(0)), dim=dim)
        return gathered.to(device=tensor.device, dtype=tensor.dtype)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        buf, staged = self._buffer(tensor)
        if staged.is_cuda:
            torch.cuda.current_stream().synchronize()
        self.comm.Bcast(buf, root=src)
        if staged.data_ptr() != tensor.data_ptr():
            tensor.copy_(staged)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.comm.bcast(obj, root=src)

    def barrier(self) -> None:
        self.comm.Barrier()

    def send(self, tensor: torch.Tensor, dst: int) -> Any:
        buf, staged = self._buffer(tensor)
        if staged.is_cuda:
            torch.cuda.current_stream().synchronize()
        return _Pending(self.comm.Isend(buf, dest=dst), staged)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        buf, staged = self._buffer(tensor)
        self.comm.Recv(buf, source=src)
        if staged.data_ptr() != tensor.data_ptr():
            tensor.copy_(staged)
        return tensor

    def split(self, color: int) -> "MpiCommunicator":
        """The sub-communicator of the ranks that pass the same color."""
        return MpiCommunicator(self.comm.Split(color, self.rank))


class _Pending:
    """An MPI send in flight; keeps its (possibly staged) buffer alive until wait()."""

    def __init__(self, request: Any, buffer: torch.Tensor):
        self.request, self.buffer = request, buffer

    def wait(self) -> None:
        self.request.Wait()


def mpi4py_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True
