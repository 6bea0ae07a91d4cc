"""Pipeline parallelism: consecutive layers per stage, activations passed stage to stage.

World = TP x PP ranks. Stage s holds ranks s*TP .. s*TP+TP-1 (consecutive ranks, which launchers
place on one host, so each stage's tensor-parallel all-reduces stay inside a host) and layers
layers[s]. Every rank of a stage holds the full hidden state after each layer, so tensor-parallel
rank t of stage s passes it to tensor-parallel rank t of stage s+1: one message per stage boundary
instead of two all-reduces per layer across hosts. The last stage's logits go to every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..distributed.comm import Communicator

if TYPE_CHECKING:
    from ..model.transformer import Transformer


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


def whole_model(n_layers: int) -> PipelineStage:
    return PipelineStage(range(n_layers), n_layers)


def pipeline_stage(rank: int, tp: int, pp: int, n_layers: int, comm: Communicator,
                   split: list[int] | None = None, micro_batches: int | None = None) -> PipelineStage:
    """Stage rank // tp of `pp`, for a world communicator `comm`."""
    ranges = split_layers(n_layers, pp, split)
    if pp == 1:
        return whole_model(n_layers)
    stage = rank // tp
    return PipelineStage(ranges[stage], n_layers, stage, pp, comm, rank,
                         prev=rank - tp if stage > 0 else None, next=rank + tp if stage < pp - 1 else None,
                         last_root=(pp - 1) * tp, micro_batches=micro_batches or pp)


StepDone = Callable[[int, int, "torch.Tensor | None"], bool]


def row_groups(rows: int, stages: int) -> list[slice]:
    """Consecutive rows in at most one group per stage, as even as possible (a group's cache rows are then
    a view of the cache, not a gathered copy)."""
    n = min(rows, stages)
    starts = [g * (rows // n) + min(g, rows % n) for g in range(n + 1)]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


def decode_interleaved(model: "Transformer", step: Callable[..., torch.Tensor], groups: list[slice], pos: int,
                       inputs: Callable[[int, int], torch.Tensor], step_done: StepDone) -> None:
    """Decode groups of rows through the stages at once: while stage s runs group g's step, stage s-1
    runs group g+1's, so no stage waits for another once the pipeline is full.

    Group g enters the first stage at ticks g, g + P, g + 2P, ... (P stages, at most P groups): its
    step takes one tick per stage, so its next token, chosen by the driver as the step leaves the last
    stage, is ready just as its turn comes round again. Every rank keeps the same schedule, so stage s
    knows it holds what entered the first stage s ticks ago. groups: consecutive cache rows each
    (row_groups); step(x, p, rows): this stage's share of one token per row (generation's stage step,
    compiled or not). Starting at `pos` for every group:
    inputs(g, p) gives the tokens [rows, 1] group g feeds at position p (on every rank, only the first
    stage reads them); step_done(g, p, logits) runs on every rank, in the same order, once group g's
    step at p has left the last stage (logits [rows, 1, vocab] on rank 0, None elsewhere) and says
    whether the group goes on to p + 1.
    """
    stage = model.stage
    if len(groups) > stage.count:
        raise ValueError(f"{len(groups)} row groups for {stage.count} pipeline stages: at most one group per stage.")
    position, live = [pos] * len(groups), [True] * len(groups)
    entered: list[tuple[int, int] | None] = []  # (group, position) that entered the first stage, per tick
    sending: list = []
    logits = None
    while True:
        group = len(entered) % stage.count
        entered.append((group, position[group]) if group < len(groups) and live[group] else None)
        if all(item is None for item in entered[-stage.count:]):  # nothing entered or in flight
            break
        tick = len(entered) - 1
        mine = entered[tick - stage.index] if tick >= stage.index else None
        if mine is not None:
            rows, p = groups[mine[0]], mine[1]
            x = inputs(*mine) if stage.is_first else stage.receive((rows.stop - rows.start, 1, model.args.dim),
                                                                     model.act_dtype, model.rope.device)
            out = step(x, p, rows)
            if stage.is_last:
                logits = out
            else:
                sending.append(stage.send(out))
                while len(sending) > 1:  # the one before has surely been received by now
                    sending.pop(0).wait()
        done = entered[tick - stage.count + 1] if tick >= stage.count - 1 else None
        if done is not None:
            group, p = done
            rows = groups[group]
            shape = (rows.stop - rows.start, 1, model.args.vocab_size)
            live[group] = step_done(group, p, stage.logits_to_driver(logits, shape, model.rope.device))
            position[group] = p + 1
    for handle in sending:
        handle.wait()
