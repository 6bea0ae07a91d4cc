"""The Llama network (Llama 1/2/3, GQA), written once for any tensor-parallel size.

Reads top to bottom like Meta's llama/model.py: RMSNorm, rotary embeddings in Meta's
interleaved pair layout, attention with a preallocated KV cache, SwiGLU feed-forward.
Every projection is a model-parallel layer, so per layer there are exactly two all-reduces
(after wo and after w2) and one gather for the logits. q/k/v and w1/w3 are fused into one
matrix each per shard (one matmul instead of three or two); the loader assembles them from
the canonical per-projection weights (checkpoint/shard.py: FUSED).

Rows of a batch may sit at different positions and in any cache slot, which is what the
server's continuous batching needs; Meta-style generation is the special case of one
start position for all rows in slots 0..B-1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.comm import Communicator
from ..parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding
from ..parallel.pipeline import PipelineStage, whole_model
from . import gpu_attention
from .args import ModelArgs

Slots = torch.Tensor | slice | None  # cache rows of a batch: indices, a run of consecutive rows, or 0..B-1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies, with Llama 3.1's long-context scaling when configured."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    s = args.rope_scaling
    if s:
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        freqs = torch.where(wavelen < old_len / high, freqs,
                            torch.where(wavelen > old_len / low, freqs / factor,
                                        (1 - smooth) * freqs / factor + smooth * freqs))
    return freqs


def rope_table(args: ModelArgs, length: int) -> torch.Tensor:
    """[length, head_dim/2, 2] table of (cos, sin) per position and pair."""
    angles = torch.outer(torch.arange(length, dtype=torch.float64), rope_frequencies(args))
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [batch, seq, heads, head_dim] by rope [batch, seq, head_dim/2, 2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def decode_attention_cpu(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of a few query rows, as plain fp32 matmuls: for one decoded token the CPU flash kernel's
    set-up costs more than the arithmetic, and bf16 matmuls on CPUs without bf16 units are slower than
    converting (SmolLM2 decode on 2 AVX2 cores: 110 us per layer with SDPA, under 40 us this way)."""
    scores = (q.float() @ keys.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ values.float()).type_as(q)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, comm: Communicator, dtype=None, device=None):
        super().__init__()
        tp = comm.world_size
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // tp
        # With more ranks than kv heads, each rank keeps a copy of the one kv head its q heads use.
        self.n_local_kv_heads = max(1, args.n_kv_heads // tp)
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        local_qkv = (self.n_local_heads + 2 * self.n_local_kv_heads) * self.head_dim
        kw = dict(comm=comm, dtype=dtype, device=device)
        self.wqkv = ColumnParallelLinear(args.dim, local_qkv * tp, gather_output=False, **kw)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, input_is_parallel=True, **kw)
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device) -> None:
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, norm: RMSNorm, pos: torch.Tensor, rope: torch.Tensor,
                mask: torch.Tensor | None, slots: Slots, length: int) -> torch.Tensor:
        """x + attention over norm(x). pos [B, S]: each token's position; slots: cache rows, [B] or
        consecutive ones as a slice (None: rows 0..B-1); attend to [0, length). The norm and the residual
        are handed to the projections, whose one-row kernel applies them as it streams the weights."""
        bsz, seqlen, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_local_heads, self.n_local_kv_heads
        qkv = self.wqkv(x, norm)
        slots = slice(0, bsz) if slots is None else slots
        rows = torch.arange(slots.start, slots.stop, device=x.device) if isinstance(slots, slice) else slots
        if gpu_attention.enabled(x, hd):  # one token per row: one kernel (a decode mask is always "up to pos")
            out = gpu_attention.decode_attention(qkv, rope, self.cache_k, self.cache_v, rows, pos[:, 0], self.n_rep)
            return self.wo(out, residual=x)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rotary(q.view(bsz, seqlen, nh, hd), rope)
        k = apply_rotary(k.view(bsz, seqlen, nkv, hd), rope)
        v = v.view(bsz, seqlen, nkv, hd)
        rows = rows.view(bsz, 1).expand(bsz, seqlen)
        self.cache_k[rows, :, pos] = k
        self.cache_v[rows, :, pos] = v
        # consecutive rows attend over a view of the cache; others over a gathered copy of their rows
        keys, values = self.cache_k[slots, :, :length], self.cache_v[slots, :, :length]
        # GQA without copying the cache: the n_rep query heads of one kv head attend as n_rep * seqlen rows
        q = q.transpose(1, 2).reshape(bsz, nkv, self.n_rep * seqlen, hd)
        if mask is not None and self.n_rep > 1:
            mask = mask.unsqueeze(2).expand(-1, -1, self.n_rep, -1, -1).reshape(bsz, 1, self.n_rep * seqlen, -1)
        if x.device.type == "cpu" and seqlen == 1:
            out = decode_attention_cpu(q, keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(out.view(bsz, nh, seqlen, hd).transpose(1, 2).reshape(bsz, seqlen, -1), residual=x)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, comm: Communicator, dtype=None, device=None):
        super().__init__()
        kw = dict(comm=comm, dtype=dtype, device=device)
        self.w13 = ColumnParallelLinear(args.dim, 2 * args.hidden_dim, gather_output=False, **kw)
        self.w2 = RowParallelLinear(args.hidden_dim, args.dim, input_is_parallel=True, **kw)

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x + w2(silu(gate) * up) with [gate, up] = w13(norm(x)), SwiGLU (applied inside w2's input)."""
        return self.w2(self.w13(x, norm), gated=True, residual=x)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, comm: Communicator, dtype=None, device=None):
        super().__init__()
        self.attention = Attention(args, comm, dtype, device)
        self.feed_forward = FeedForward(args, comm, dtype, device)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)

    def forward(self, x, pos, rope, mask, slots, length) -> torch.Tensor:
        h = self.attention(x, self.attention_norm, pos, rope, mask, slots, length)  # residuals included
        return self.feed_forward(h, self.ffn_norm)


MIN_MICRO_BATCH_TOKENS = 64  # below this, a pipeline part is too small to be worth another pass over a stage


class Transformer(nn.Module):
    """Parameters are created at this rank's shard size (on the `meta` device when loading).

    With a pipeline `stage`, only its layers exist (named by their global index, as in the
    checkpoint), the embedding only on the first stage and norm + output only on the last.
    """

    def __init__(self, args: ModelArgs, comm: Communicator, dtype=None, device=None,
                 stage: PipelineStage | None = None):
        super().__init__()
        args.check_world_size(comm.world_size)
        self.args, self.comm = args, comm
        self.stage = stage = stage or whole_model(args.n_layers)
        if stage.is_first:
            embedding = VocabParallelEmbedding if args.vocab_parallel_embedding else ParallelEmbedding
            self.tok_embeddings = embedding(args.vocab_size, args.dim, comm, dtype=dtype, device=device)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, comm, dtype, device) for i in stage.layers})
        if stage.is_last:
            self.norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
            self.output = ColumnParallelLinear(args.dim, args.vocab_size, comm, gather_output=True,
                                               dtype=dtype, device=device)
        self.rope: torch.Tensor | None = None

    @property
    def act_dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).attention_norm.weight.dtype

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device) -> None:
        """Allocate the KV cache (in the activation dtype) and the rotary table once."""
        for layer in self.layers.values():
            layer.attention.setup_cache(max_batch_size, max_seq_len, dtype, device)
        self.rope = rope_table(self.args, max_seq_len).to(device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    @torch.no_grad()  # not inference_mode: its tensors cannot enter a compiled graph
    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, last_only: bool = False,
                slots: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
        """Logits (float32, full vocabulary on every rank) for `tokens` [B, S] placed at start_pos.. .

        start_pos: an int for all rows, or a tensor [B] per row. slots: cache rows per batch row
        (None: rows 0..B-1). length: how much of the cache to attend to; defaults to the end of the
        furthest row (pass max_seq_len for the fixed shapes a compiled decode step needs).
        Every rank calls it with the same tokens, whichever stage it holds.
        """
        pos, mask, length = self._placement(tokens.shape, tokens.device, start_pos, slots, length)
        if self.stage.pipelined:
            return self._pipelined(tokens, pos, mask, slots, length, last_only)
        return self._head(self._stage(tokens, pos, mask, slots, length), last_only)

    @torch.no_grad()
    def stage_forward(self, x: torch.Tensor, start_pos: int | torch.Tensor, slots: Slots = None,
                      length: int | None = None) -> torch.Tensor:
        """This stage's share of a forward, sending and receiving left to the caller (a pipeline
        schedule, or a compiled step that must not hold them): x is the tokens [B, S] on the first
        stage, else the hidden state [B, S, dim] the stage before produced. Returns the hidden state
        for the next stage or, on the last stage, the logits of each row's final position.
        Arguments as in forward; one stage holding every layer makes this the whole model."""
        pos, mask, length = self._placement(x.shape[:2], x.device, start_pos, slots, length)
        h = self._stage(x, pos, mask, slots, length)
        return self._head(h, last_only=True) if self.stage.is_last else h

    def _placement(self, shape: tuple[int, ...], device: torch.device, start_pos: int | torch.Tensor,
                   slots: Slots, length: int | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Each token's position, the attention mask (None where a row sees the whole window) and the
        cache length attended to."""
        bsz, seqlen = shape
        offsets = torch.arange(seqlen, device=device)
        if isinstance(start_pos, int):
            end = start_pos + seqlen
            pos = (start_pos + offsets).expand(bsz, seqlen)
        else:
            pos = start_pos.view(bsz, 1) + offsets
            end = None
        if length is None:
            length = end if end is not None else int(pos.max()) + 1
        if length > self.max_seq_len or (slots is None and bsz > self.max_batch_size):
            raise ValueError(f"{bsz} x {length} tokens exceed the cache ({self.max_batch_size} x "
                             f"{self.max_seq_len}); raise max_batch_size / max_seq_len.")
        mask = None
        if not (seqlen == 1 and end == length):  # visible: cached positions up to each token's own
            mask = (torch.arange(length, device=device) <= pos[..., None]).unsqueeze(1)
        return pos, mask, length

    def _stage(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, slots: Slots,
               length: int) -> torch.Tensor:
        """The hidden state after this stage's layers: x is tokens on the first stage, else a hidden state."""
        h = self.tok_embeddings(x).to(self.act_dtype) if self.stage.is_first else x  # int8 tables give fp32
        rope = self.rope[pos]
        for layer in self.layers.values():
            h = layer(h, pos, rope, mask, slots, length)
        return h

    def _head(self, h: torch.Tensor, last_only: bool) -> torch.Tensor:
        """The last stage's float32 logits (of each row's final position only, if last_only)."""
        if last_only:
            h = h[:, -1:]
        return self.output(h, self.norm).float()

    def _pipelined(self, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                   slots: torch.Tensor | None, length: int, last_only: bool) -> torch.Tensor:
        """The batch in micro-batches: while stage s works on micro-batch m, stage s-1 works on m+1.

        A micro-batch is a group of rows or, for fewer rows than micro-batches (one long prompt), a
        chunk of the sequence: chunk c attends to chunks before it, which this stage has already
        cached. Too few tokens per part is slower (each part reads the stage's weights again), so
        parts hold at least MIN_MICRO_BATCH_TOKENS tokens: decode steps of small batches run whole.
        """
        stage, (bsz, seqlen), device = self.stage, tokens.shape, tokens.device
        rows = slots if slots is not None else torch.arange(bsz, device=device)
        n_parts = max(1, min(stage.micro_batches, bsz * seqlen // MIN_MICRO_BATCH_TOKENS))
        by_rows = bsz >= n_parts
        if by_rows:  # (row indices, sequence slice) per part
            parts = [(idx, slice(None)) for idx in torch.arange(bsz, device=device).tensor_split(n_parts)]
        else:
            cuts = torch.arange(seqlen).tensor_split(min(n_parts, seqlen))  # never an empty chunk
            parts = [(torch.arange(bsz, device=device), slice(int(c[0]), int(c[-1]) + 1)) for c in cuts]
        logits, sending = [], []
        for idx, cols in parts:
            part_pos = pos[idx][:, cols]
            x = tokens[idx][:, cols] if stage.is_first else stage.receive(
                (*part_pos.shape, self.args.dim), self.act_dtype, device)
            h = self._stage(x, part_pos, None if mask is None else mask[idx][:, :, cols], rows[idx], length)
            if not stage.is_last:
                sending.append(stage.send(h))
            elif by_rows or not last_only or cols == parts[-1][1]:  # last_only over chunks: the final one
                logits.append(self._head(h, last_only))
        for handle in sending:
            handle.wait()
        shape = (bsz, 1 if last_only else seqlen, self.args.vocab_size)
        return stage.share_logits(torch.cat(logits, dim=0 if by_rows else 1) if logits else None, shape, device)
