"""Pipeline parallelism: which stage this rank runs and how activations move between stages.

Every rank of a stage holds the full hidden state after each layer, so tensor-parallel rank t of stage s
passes it to tensor-parallel rank t of stage s+1: one message per stage boundary instead of two all-reduces
per layer across hosts. The last stage's logits go to every rank (or to the driver alone).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.comm import Communicator
from ..distributed.context import ParallelContext
from ..distributed.layout import ParallelConfig, split_layers


@dataclass(frozen=True)
class PipelineStage:
    """This rank's part of the layer stack and its neighbours (world ranks; None at either end)."""

    layers: range
    n_layers: int
    index: int = 0  # this stage's place in the pipeline
    count: int = 1  # stages in the pipeline
    comm: Communicator | None = None  # the world: send/recv and the logits broadcast (None: one stage)
    rank: int = 0  # this rank in the world
    prev: int | None = None
    next: int | None = None
    last_root: int = 0  # the world rank whose logits every rank receives
    micro_batches: int = 1  # a batch is cut into this many parts that flow through the stages in turn

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.stop == self.n_layers

    @property
    def pipelined(self) -> bool:
        return self.comm is not None

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.comm.recv(torch.empty(shape, dtype=dtype, device=device), self.prev)

    def send(self, hidden: torch.Tensor):
        """Start sending to the next stage; returns what to wait on before the tensor may change."""
        return self.comm.send(hidden.contiguous(), self.next)

    def share_logits(self, logits: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The last stage's logits, on every rank."""
        if logits is None:
            logits = torch.empty(shape, dtype=torch.float32, device=device)
        return self.comm.broadcast(logits.contiguous(), src=self.last_root)

    def logits_to_driver(self, logits: torch.Tensor | None, shape: tuple[int, ...],
                         device: torch.device) -> torch.Tensor | None:
        """The last stage's logits on rank 0 alone (the driver chooses the tokens); None elsewhere."""
        if self.rank == self.last_root:
            self.comm.send(logits.contiguous(), 0).wait()
        elif self.rank == 0:
            return self.comm.recv(torch.empty(shape, dtype=torch.float32, device=device), self.last_root)
        return None


def pipeline_stage(ctx: ParallelContext, n_layers: int, config: ParallelConfig = ParallelConfig()) -> PipelineStage:
    """This rank's stage: stage rank // TP of ctx.pp_size, with the layers config.pp_split gives it."""
    ranges = split_layers(n_layers, ctx.pp_size, config.pp_split)
    if ctx.pp_size == 1:
        return PipelineStage(range(n_layers), n_layers)
    tp, pp, rank = ctx.tp_size, ctx.pp_size, ctx.rank
    stage = rank // tp
    return PipelineStage(ranges[stage], n_layers, stage, pp, ctx.comm, rank,
                         prev=rank - tp if stage > 0 else None, next=rank + tp if stage < pp - 1 else None,
                         last_root=(pp - 1) * tp, micro_batches=config.micro_batches or pp)


def row_groups(rows: int, stages: int) -> list[slice]:
    """Consecutive rows in at most one group per stage, as even as possible (a group's cache rows are then
    a view of the cache, not a gathered copy)."""
    n = min(rows, stages)
    starts = [g * (rows // n) + min(g, rows % n) for g in range(n + 1)]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]
