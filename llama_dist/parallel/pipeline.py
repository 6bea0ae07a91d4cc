"""Pipeline parallelism: consecutive layers per stage, activations passed stage to stage.

World = TP x PP ranks. Stage s holds ranks s*TP .. s*TP+TP-1 (consecutive ranks, which launchers
place on one host, so each stage's tensor-parallel all-reduces stay inside a host) and layers
layers[s]. Every rank of a stage holds the full hidden state after each layer, so tensor-parallel
rank t of stage s passes it to tensor-parallel rank t of stage s+1: one message per stage boundary
instead of two all-reduces per layer across hosts. The last stage's logits go to every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.comm import Communicator


def split_layers(n_layers: int, pp: int, split: list[int] | None = None) -> list[range]:
    """Layer ranges per stage: `split` gives each stage's layer count (uneven memory), else as even
    as possible with the earlier stages taking the remainder."""
    if pp < 1:
        raise ValueError(f"--pp {pp}: the pipeline needs at least one stage.")
    if pp > n_layers:
        raise ValueError(f"--pp {pp} is more pipeline stages than the model's {n_layers} layers; "
                         f"use at most {n_layers}.")
    if split is None:
        split = [n_layers // pp + (s < n_layers % pp) for s in range(pp)]
    if len(split) != pp:
        raise ValueError(f"--pp-split {','.join(map(str, split))} names {len(split)} stages, but --pp is {pp}.")
    if any(n < 1 for n in split):
        raise ValueError(f"--pp-split {','.join(map(str, split))} leaves a stage without layers; "
                         "give every stage at least one.")
    if sum(split) != n_layers:
        raise ValueError(f"--pp-split {','.join(map(str, split))} covers {sum(split)} layers; the model has "
                         f"{n_layers}.")
    starts = [sum(split[:s]) for s in range(pp)]
    return [range(start, start + n) for start, n in zip(starts, split)]


def parse_split(value: str | int | list | tuple | None) -> list[int] | None:
    """--pp-split as the command line gives it ("10,20", or a tuple from fire) -> layer counts."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def check_layout(world_size: int, pp: int) -> int:
    """The tensor-parallel size of a world of `world_size` ranks in `pp` stages."""
    if pp < 1 or world_size % pp:
        raise ValueError(f"{world_size} rank(s) cannot form {pp} pipeline stages: TP x PP must equal the number "
                         f"of ranks. Launch a multiple of {pp} ranks, or pick a --pp that divides {world_size}.")
    return world_size // pp


@dataclass(frozen=True)
class PipelineStage:
    """This rank's part of the layer stack and its neighbours (world ranks; None at either end)."""

    layers: range
    n_layers: int
    comm: Communicator | None = None  # the world: send/recv and the logits broadcast (None: one stage)
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


def whole_model(n_layers: int) -> PipelineStage:
    return PipelineStage(range(n_layers), n_layers)


def pipeline_stage(rank: int, tp: int, pp: int, n_layers: int, comm: Communicator,
                   split: list[int] | None = None, micro_batches: int | None = None) -> PipelineStage:
    """Stage rank // tp of `pp`, for a world communicator `comm`."""
    ranges = split_layers(n_layers, pp, split)
    if pp == 1:
        return whole_model(n_layers)
    stage = rank // tp
    return PipelineStage(ranges[stage], n_layers, comm,
                         prev=rank - tp if stage > 0 else None, next=rank + tp if stage < pp - 1 else None,
                         last_root=(pp - 1) * tp, micro_batches=micro_batches or pp)
