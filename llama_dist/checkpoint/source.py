"""The interface every checkpoint format implements: a ModelArgs plus per-rank slices by canonical name."""
from __future__ import annotations

from typing import Protocol

import torch

from ..model.args import ModelArgs
from .shard import ShardLayout


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given; the message says what is wrong and what to do."""


class CheckpointSource(Protocol):
    format: str
    args: ModelArgs

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        """The `layout` slice of canonical parameter `name`, reading as little of the file as possible."""
        ...


class StateDictSource:
    """An in-memory state dict of full tensors in canonical names (random-weight models, tests)."""

    format = "state_dict"

    def __init__(self, args: ModelArgs, state_dict: dict[str, torch.Tensor]):
        self.args, self.state_dict = args, state_dict

    def read(self, name: str, layout: ShardLayout) -> torch.Tensor:
        return layout.take(self.state_dict[name])
