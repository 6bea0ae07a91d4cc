"""How ranks and layers are laid out: tensor-parallel groups inside pipeline stages, layers per stage.

World = TP x PP ranks. Stage s holds ranks s*TP .. s*TP+TP-1 (consecutive ranks, which launchers
place on one host, so each stage's all-reduces stay inside a host) and a consecutive range of layers.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    """How a run spreads over its ranks. backend: auto | nccl | gloo | mpi; device: where this rank runs
    (None: its GPU, else the CPU); pp: pipeline stages; pp_split: layers per stage (None: even);
    micro_batches: parts a batch is cut into so the stages work at once (None: one per stage)."""

    backend: str = "auto"
    device: str | None = None
    pp: int = 1
    pp_split: tuple[int, ...] | None = None
    micro_batches: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "pp_split", parse_split(self.pp_split))


def parse_split(value: str | int | list | tuple | None) -> tuple[int, ...] | None:
    """Layers per stage as given ("10,20", a number, or a sequence) -> a tuple of counts."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def check_layout(world_size: int, pp: int) -> int:
    """The tensor-parallel size of a world of `world_size` ranks in `pp` stages."""
    if pp < 1 or world_size % pp:
        raise ValueError(f"{world_size} rank(s) cannot form {pp} pipeline stages: TP x PP must equal the number "
                         f"of ranks. Launch a multiple of {pp} ranks, or choose a pp that divides {world_size}.")
    return world_size // pp


def split_layers(n_layers: int, pp: int, split: tuple[int, ...] | list[int] | None = None) -> list[range]:
    """Layer ranges per stage: `split` gives each stage's layer count (uneven memory), else as even
    as possible with the earlier stages taking the remainder."""
    if pp < 1:
        raise ValueError(f"pp={pp}: the pipeline needs at least one stage.")
    if pp > n_layers:
        raise ValueError(f"pp={pp} is more pipeline stages than the model's {n_layers} layers; "
                         f"use at most {n_layers}.")
    if split is None:
        split = [n_layers // pp + (s < n_layers % pp) for s in range(pp)]
    named = ",".join(map(str, split))
    if len(split) != pp:
        raise ValueError(f"pp_split={named} names {len(split)} stages, but pp is {pp}.")
    if any(n < 1 for n in split):
        raise ValueError(f"pp_split={named} leaves a stage without layers; give every stage at least one.")
    if sum(split) != n_layers:
        raise ValueError(f"pp_split={named} covers {sum(split)} layers; the model has {n_layers}.")
    starts = [sum(split[:s]) for s in range(pp)]
    return [range(start, start + n) for start, n in zip(starts, split)]
