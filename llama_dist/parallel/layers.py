"""Model-parallel layers with fairscale's semantics; weights are allocated at shard size.

Each layer holds only its rank's slice of the full weight and talks to the other ranks through
a Communicator, so the same layers run in one process (identity collectives) or across ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.comm import Communicator
from ..quant import gpu_gemv
from ..quant.weights import QuantizedWeight


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({parts}).")
    return total // parts


class ShardedWeight(nn.Module):
    """A layer's local weight shard: dense, or replaced by a quantized one after loading."""

    weight: nn.Parameter | None

    def __init__(self):
        super().__init__()
        self.qweight: QuantizedWeight | None = None

    def set_quantized(self, qweight: QuantizedWeight) -> None:
        self.weight = None
        self.qweight = qweight

    def local_linear(self, x: torch.Tensor, norm: nn.Module | None = None, gated: bool = False,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + (this shard's product with norm(x), or with silu(gate) * up of x = [gate, up] when
        gated). One row on CUDA does all of it in one kernel (quant/gpu_gemv.py); elsewhere step by step."""
        if gpu_gemv.enabled(x):  # (checked first: no work on the CPU path)
            operands = (self.weight, None) if self.qweight is None else self.qweight.gemv_operands()
            if operands is not None:
                return gpu_gemv.gemv(x, *operands, gated=gated, residual=residual,
                                     **({} if norm is None else {"norm_weight": norm.weight, "eps": norm.eps}))
        if norm is not None:
            x = norm(x)
        if gated:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        y = self.qweight(x) if self.qweight is not None else F.linear(x, self.weight)
        return y if residual is None else residual + y

    def local_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(ids) if self.qweight is not None else F.embedding(ids, self.weight)


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

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """norm: an RMSNorm the input goes through first (so the one-row kernel can apply it)."""
        y = self.local_linear(x, norm)
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

    def forward(self, x: torch.Tensor, gated: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """gated: x is [gate, up] and the input silu(gate) * up (SwiGLU). residual: added to the sum, by
        rank 0 before the reduction, so that no rank needs another kernel after it."""
        if not self.input_is_parallel:
            x = x.narrow(-1, self.comm.rank * self.local_in, self.local_in)
        y = self.comm.all_reduce(self.local_linear(x, gated=gated, residual=residual if self.comm.rank == 0 else None))
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
