"""Model-parallel layers with fairscale's semantics; weights are allocated at shard size.

Each layer holds only its rank's slice of the full weight and talks to the other ranks through
a Communicator, so the same layers run in one process (identity collectives) or across ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.comm import Communicator


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({parts}).")
    return total // parts


class ShardedWeight(nn.Module):
    """A layer's local weight shard: dense, or replaced after loading by a quantized module (quant/weights.py)
    that computes the same product, x W^T, from its packed form."""

    weight: nn.Parameter | None
    dense_product = staticmethod(F.linear)  # x W^T of a dense shard (kernels/invariant.py gives another)

    def __init__(self):
        super().__init__()
        self.qweight: nn.Module | None = None

    def set_quantized(self, qweight: nn.Module) -> None:
        self.weight = None
        self.qweight = qweight

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x times this rank's shard: x W^T, before any communication."""
        return self.qweight(x) if self.qweight is not None else self.dense_product(x, self.weight)

    def local_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(ids) if self.qweight is not None else F.embedding(ids, self.weight)

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W, its scales or None) of this shard for the CUDA one-row kernels (kernels/gemv.py), or None where
        its quantized format has no such form."""
        return (self.weight, None) if self.qweight is None else self.qweight.gemv_operands()


class ColumnParallelLinear(ShardedWeight):
    """y = x A^T with A split along its output rows; each rank computes its slice of y.

    gather_output=True concatenates the slices so every rank holds the full y.
    """

    def __init__(self, in_features: int, out_features: int, comm: Communicator, bias: bool = False,
                 gather_output: bool = True, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.comm, self.gather_output = comm, gather_output
        self.in_features, self.out_features = in_features, out_features
        local_out = divide(out_features, comm.world_size, "output features")
        self.weight = nn.Parameter(torch.empty(local_out, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(local_out, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.local_linear(x))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """This shard's product -> the layer's output: the bias added, the slices gathered where asked."""
        if self.bias is not None:
            y = y + self.bias
        return self.comm.all_gather(y, dim=-1) if self.gather_output else y


class RowParallelLinear(ShardedWeight):
    """y = x A^T with A split along its input columns; partial products are summed across ranks.

    input_is_parallel=True means x already holds this rank's slice (the output of a
    ColumnParallelLinear with gather_output=False); otherwise x is full and is sliced here.
    """

    def __init__(self, in_features: int, out_features: int, comm: Communicator, bias: bool = False,
                 input_is_parallel: bool = False, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.comm, self.input_is_parallel = comm, input_is_parallel
        self.in_features, self.out_features = in_features, out_features
        self.local_in = divide(in_features, comm.world_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = x.narrow(-1, self.comm.rank * self.local_in, self.local_in)
        y = self.comm.all_reduce(self.local_linear(x))
        return y + self.bias if self.bias is not None else y


class ParallelEmbedding(ShardedWeight):
    """Embedding split along the embedding dim (Llama 1/2 checkpoints); slices are gathered."""

    def __init__(self, num_embeddings: int, embedding_dim: int, comm: Communicator,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.comm = comm
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local_dim = divide(embedding_dim, comm.world_size, "embedding dim")
        self.weight = nn.Parameter(torch.empty(num_embeddings, local_dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(self.local_lookup(ids), dim=-1)


class VocabParallelEmbedding(ShardedWeight):
    """Embedding split along the vocabulary (Llama 3): each rank looks up the ids it owns, others add zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, comm: Communicator,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.comm = comm
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.local_vocab = local_vocab = divide(num_embeddings, comm.world_size, "vocabulary size")
        self.vocab_start = comm.rank * local_vocab
        self.weight = nn.Parameter(torch.empty(local_vocab, embedding_dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.world_size == 1:
            return self.local_lookup(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = self.local_lookup(local.masked_fill(outside, 0))
        return self.comm.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))
