"""Peer slots: buffers every rank of a tensor-parallel group can write into (symmetric memory over NVLink),
and the counters that say when every rank's partial sums have arrived. With them a decoded row's
row-parallel product is summed by the kernel that reads it next (kernels/gemv.py), not by an all-reduce
between the two: a layer runs the kernels it runs in one process, with no collective's launch or barrier.

The protocol, per site (one row-parallel product of a decode step, two per layer):
- each program of the producer kernel on rank r writes its rows of partial sums into slot r of the site on
  every rank and counts itself in `arrivals` (a release at system scope: its writes are seen first); the last
  to arrive adds one to every rank's counter of the site (one signal per rank: a signal per program would
  queue at one address);
- a kernel reading the site waits until its own counter reaches epoch x world (every rank's part of this
  step), then sums the slots in rank order, so every rank gets the same values.
`epoch` counts the steps taken this way; each step adds one before its first kernel. Counters only grow
(wrapping at 2^32, which the equality test survives), so nothing is reset between steps. A slot is not
written again before every rank has read it: the next step's writer of site s has waited, at site s - 1, for
data the reader wrote after reading site s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeerSlots:
    """This rank's view of the group's slots: `slots` [sites, world, dim] and `counters` [sites] (int32) live
    here; `peers` [world, 2] (int64) holds each rank's slots and counters addresses, this rank's included;
    `arrivals` [sites] (int32, zeros) counts this rank's producer programs."""

    rank: int
    world_size: int
    slots: torch.Tensor
    counters: torch.Tensor
    arrivals: torch.Tensor
    peers: torch.Tensor
    epoch: torch.Tensor  # [1] int32

    def next_step(self) -> None:
        """Count a step before its first kernel (on the stream, so a CUDA graph replays it)."""
        self.epoch.add_(1)


@dataclass(frozen=True)
class PeerSum:
    """A row summed over the ranks that is still in its parts: the slots of one site. The kernels that read it
    add the parts themselves."""

    peer: PeerSlots
    site: int


def allocate(group_name: str, rank: int, world_size: int, sites: int, dim: int, dtype: torch.dtype,
             device: torch.device) -> PeerSlots:
    """The group's slots in symmetric memory, counters zeroed on this rank: every rank of the group calls this
    at once, and must pass a barrier before any rank writes."""
    import torch.distributed._symmetric_memory as symm_mem

    counter_bytes = 4 * sites + (-4 * sites) % 128  # the slots start 128-byte aligned
    slot_bytes = sites * world_size * dim * torch.empty(0, dtype=dtype).element_size()
    symm_mem.enable_symm_mem_for_group(group_name)
    buffer = symm_mem.empty(counter_bytes + slot_bytes, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buffer, group_name)
    buffer.zero_()
    return PeerSlots(rank, world_size,
                     slots=buffer[counter_bytes:].view(dtype).view(sites, world_size, dim),
                     counters=buffer[:4 * sites].view(torch.int32),
                     arrivals=torch.zeros(sites, dtype=torch.int32, device=device),
                     peers=torch.tensor([(base + counter_bytes, base) for base in handle.buffer_ptrs],
                                        dtype=torch.int64, device=device),
                     epoch=torch.zeros(1, dtype=torch.int32, device=device))
