"""The Llama network (Llama 1/2/3, GQA), written once for any tensor-parallel size.

Reads top to bottom like Meta's llama/model.py: RMSNorm, rotary embeddings in Meta's
interleaved pair layout, attention with a preallocated, paged KV cache, SwiGLU feed-forward.
Every projection is a model-parallel layer, so per layer there are exactly two all-reduces
(after wo and after w2) and one gather for the logits. q/k/v and w1/w3 are fused into one
matrix each per shard (one matmul instead of three or two); the loader assembles them from
the canonical per-projection weights (checkpoint/shard.py: FUSED).

Rows of a batch may sit at different positions and in any cache row, which is what the
server's continuous batching needs; Meta-style generation is the special case of one
start position for all rows in rows 0..B-1. The cache is paged (vLLM's layout): blocks of KV_BLOCK
positions, and a block table saying which block holds each row's positions p .. p + KV_BLOCK - 1. A
server gives a sequence blocks as it grows and lets sequences with a common prompt prefix share its
blocks (serving/kv_blocks.py); everything else sees row r's blocks laid out one after another.

A Transformer holds a range of layers (all of them, or one pipeline stage's): it maps tokens
(first stage) or a hidden state (later stages) to a hidden state, or (last stage) to logits.
Who sends what to whom is the runner's business (runner/); faster kernels replace modules
after loading (kernels/), computing what these modules compute.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.comm import Communicator
from ..parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, VocabParallelEmbedding
from .args import ModelArgs

KV_BLOCK = 16  # positions per KV cache block


@dataclass(frozen=True, eq=False)
class Packed:
    """Several sequences' tokens side by side in one row of a batch (a server step's prompt chunks, read in one
    pass): sequence i is lengths[i] tokens at positions starts[i].. of cache row slots[i]. Each attends to its
    own cache row, exactly as it would in a pass of its own. A sequence may continue the one before it (the
    next chunk of a long prompt, in the same row): such sequences make one run, and last_only gives each
    run's last token.

    The same layout on the device, for kernels and CUDA graphs (a replay reads no Python values): each
    token's position and cache row, each run's length, and the index of each run's last token. Build one
    with Packed.of."""

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    positions: torch.Tensor  # [tokens]
    rows: torch.Tensor  # [tokens]
    runs: torch.Tensor  # [runs]: their lengths
    finals: torch.Tensor  # [runs]: their last tokens

    @classmethod
    def of(cls, slots: tuple[int, ...], starts: tuple[int, ...], lengths: tuple[int, ...],
           device: torch.device) -> "Packed":
        positions, rows, runs, finals = packed_index(slots, starts, lengths)
        index = to_device(positions + rows + runs + finals, device)
        return cls(slots, starts, lengths, *index.split([len(positions), len(rows), len(runs), len(finals)]))


def run_ends(slots: tuple[int, ...], starts: tuple[int, ...], lengths: tuple[int, ...]) -> list[int]:
    """The packed sequences that end a run (the next one does not continue them at their row's next position)."""
    return [i for i in range(len(slots))
            if i + 1 == len(slots) or (slots[i + 1], starts[i + 1]) != (slots[i], starts[i] + lengths[i])]


def packed_index(slots: tuple[int, ...], starts: tuple[int, ...],
                 lengths: tuple[int, ...]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Packed sequences' token positions and cache rows, their runs' lengths and last tokens' indices, as lists."""
    positions = [p for start, n in zip(starts, lengths) for p in range(start, start + n)]
    rows = [slot for slot, n in zip(slots, lengths) for _ in range(n)]
    ends = list(itertools.accumulate(lengths))
    run_end = [ends[i] for i in run_ends(slots, starts, lengths)]
    return positions, rows, [b - a for a, b in zip([0] + run_end, run_end)], [e - 1 for e in run_end]


def check_packed(slots: tuple[int, ...], starts: tuple[int, ...], lengths: tuple[int, ...], n_tokens: int,
                 max_batch_size: int, n_ctx: int) -> None:
    """Packed sequences must hold n_tokens tokens and fit the cache (max_batch_size rows of n_ctx)."""
    if (not slots or n_tokens != sum(lengths) or min(lengths) < 1 or min(starts) < 0
            or max(s + n for s, n in zip(starts, lengths)) > n_ctx
            or not 0 <= min(slots) <= max(slots) < max_batch_size):
        raise ValueError(f"Packed sequences (rows {slots}, starts {starts}, lengths {lengths}) do not match their "
                         f"{n_tokens} tokens or the cache ({max_batch_size} x {n_ctx}).")


Slots = torch.Tensor | slice | Packed | None  # cache rows: indices, consecutive rows, packed sequences, or 0..B-1


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


def visible(pos: torch.Tensor, length: int) -> torch.Tensor:
    """The attention mask of tokens at positions pos [B, S] over a cache of `length`: each sees up to its own
    position. [B, 1, S, length]."""
    return (torch.arange(length, device=pos.device) <= pos[..., None]).unsqueeze(1)


def to_device(values: list, device: torch.device | str) -> torch.Tensor:
    """Host values as a tensor on `device`, copied without waiting for the device: from pinned memory on a GPU (a
    copy from pageable memory waits until the GPU has finished the work queued before it, so the host could not
    prepare a step while the one before runs)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, device=device)
    return torch.tensor(values, pin_memory=True).to(device, non_blocking=True)


def cache_rows(slots: Slots, bsz: int, device: torch.device) -> torch.Tensor:
    """The cache row of each of a batch's bsz rows, as indices [bsz]."""
    if slots is None:
        slots = slice(0, bsz)
    return torch.arange(slots.start, slots.stop, device=device) if isinstance(slots, slice) else slots


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
        self.cache_k: torch.Tensor | None = None  # [blocks, kv heads, KV_BLOCK, head_dim]
        self.cache_v: torch.Tensor | None = None
        self.block_table: torch.Tensor | None = None  # [rows, blocks per row], the model's (one for all layers)

    def setup_cache(self, n_blocks: int, block_table: torch.Tensor, dtype: torch.dtype, device) -> None:
        shape = (n_blocks, self.n_local_kv_heads, KV_BLOCK, self.head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_table = block_table

    def cache_places(self, rows: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block and the offset in it of each (cache row, position) pair (rows and pos of one shape): the
        cache's [block, :, offset] holds that position's kv heads."""
        return self.block_table[rows, pos // KV_BLOCK], pos % KV_BLOCK

    def cached(self, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values at positions 0..length-1 of cache rows [B], gathered: [B, kv heads, length,
        head_dim] each."""
        blocks = self.block_table[rows, :-(-length // KV_BLOCK)]
        return tuple(cache[blocks].transpose(1, 2).flatten(2, 3)[:, :, :length]
                     for cache in (self.cache_k, self.cache_v))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                slots: Slots, length: int) -> torch.Tensor:
        """pos [B, S]: each token's position; rope: its rotation table rows; mask: which cached positions
        each token sees (None: all of [0, length)); slots: cache rows, [B] or consecutive ones as a slice
        (None: rows 0..B-1)."""
        return self.wo(self.cached_attention(self.wqkv(x), pos, rope, mask, slots, length))

    def cached_attention(self, qkv: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                         slots: Slots, length: int) -> torch.Tensor:
        """Rotate q and k, write k and v to the cache, attend over the cache: [B, S, heads * head_dim]."""
        q = self.rotate_and_cache(qkv, pos, rope, slots)
        if not isinstance(slots, Packed):
            return self.attend_cache(q, mask, cache_rows(slots, qkv.shape[0], qkv.device), length)
        out, at = [], 0
        for slot, start, n in zip(slots.slots, slots.starts, slots.lengths):  # each over its own cache row
            end = start + n
            positions = torch.arange(start, end, device=q.device)[None]
            out.append(self.attend_cache(q[:, at:at + n], None if n == 1 else visible(positions, end),
                                         torch.tensor([slot], device=q.device), end))
            at += n
        return torch.cat(out, dim=1)

    def rotate_and_cache(self, qkv: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, slots: Slots) -> torch.Tensor:
        """Rotate q and k, write k and v to the cache at each token's row and position; the rotated q
        [B, S, heads, head_dim]."""
        bsz, seqlen, _ = qkv.shape
        hd, nh, nkv = self.head_dim, self.n_local_heads, self.n_local_kv_heads
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rotary(q.view(bsz, seqlen, nh, hd), rope)
        k = apply_rotary(k.view(bsz, seqlen, nkv, hd), rope)
        v = v.view(bsz, seqlen, nkv, hd)
        if isinstance(slots, Packed):  # each token at its own row and position
            blocks, offsets = self.cache_places(slots.rows[None], slots.positions[None])
        else:
            rows = cache_rows(slots, bsz, qkv.device).view(bsz, 1).expand(bsz, seqlen)
            blocks, offsets = self.cache_places(rows, pos)
        self.cache_k[blocks, :, offsets] = k
        self.cache_v[blocks, :, offsets] = v
        return q

    def attend_cache(self, q: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor,
                     length: int) -> torch.Tensor:
        """Rotated queries q [B, S, heads, head_dim] over the first `length` cached positions of their rows [B]."""
        bsz, seqlen, nh, hd = q.shape
        nkv = self.n_local_kv_heads
        keys, values = self.cached(rows, length)
        # GQA without copying the cache: the n_rep query heads of one kv head attend as n_rep * seqlen rows
        q = q.transpose(1, 2).reshape(bsz, nkv, self.n_rep * seqlen, hd)
        if mask is not None and self.n_rep > 1:
            mask = mask.unsqueeze(2).expand(-1, -1, self.n_rep, -1, -1).reshape(bsz, 1, self.n_rep * seqlen, -1)
        out = self.attend(q, keys, values, mask)
        return out.reshape(bsz, nh, seqlen, hd).transpose(1, 2).reshape(bsz, seqlen, -1)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v over the visible positions."""
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, comm: Communicator, dtype=None, device=None):
        super().__init__()
        kw = dict(comm=comm, dtype=dtype, device=device)
        self.w13 = ColumnParallelLinear(args.dim, 2 * args.hidden_dim, gather_output=False, **kw)
        self.w2 = RowParallelLinear(args.hidden_dim, args.dim, input_is_parallel=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: w2(silu(w1 x) * w3 x), with [w1 x, w3 x] from the fused w13."""
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, comm: Communicator, dtype=None, device=None):
        super().__init__()
        self.attention = Attention(args, comm, dtype, device)
        self.feed_forward = FeedForward(args, comm, dtype, device)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                slots: Slots, length: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), pos, rope, mask, slots, length)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Parameters are created at this rank's shard size (on the `meta` device when loading).

    `layers`: the range of layers this rank holds (a pipeline stage; default all), named by their global
    index as in the checkpoint. The first holds the embedding, the last the final norm and output.
    """

    def __init__(self, args: ModelArgs, comm: Communicator, dtype=None, device=None, layers: range | None = None):
        super().__init__()
        args.check_world_size(comm.world_size)
        self.args, self.comm = args, comm
        layers = layers if layers is not None else range(args.n_layers)
        self.is_first, self.is_last = layers.start == 0, layers.stop == args.n_layers
        if self.is_first:
            embedding = VocabParallelEmbedding if args.vocab_parallel_embedding else ParallelEmbedding
            self.tok_embeddings = embedding(args.vocab_size, args.dim, comm, dtype=dtype, device=device)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, comm, dtype, device) for i in layers})
        if self.is_last:
            self.norm = RMSNorm(args.dim, args.norm_eps, dtype, device)
            self.output = ColumnParallelLinear(args.dim, args.vocab_size, comm, gather_output=True,
                                               dtype=dtype, device=device)
        self.rope: torch.Tensor | None = None

    # Whether one token per row attends without a mask whatever the rows' positions: where every block's attention
    # kernel reads each row's cache up to the row's own position (kernels/fused.py)
    decodes_by_position = False

    @property
    def act_dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).attention_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.rope.device

    def setup_caches(self, max_batch_size: int, n_ctx: int, dtype: torch.dtype, device,
                     n_blocks: int | None = None) -> None:
        """Allocate the KV cache (in the activation dtype), its block table and the rotary table once.
        n_blocks: cache blocks of KV_BLOCK positions for all rows together (default: every row's n_ctx, so
        rows 0..max_batch_size-1 may each hold a whole context in blocks of their own)."""
        per_row = -(-n_ctx // KV_BLOCK)
        self.n_blocks = n_blocks or max_batch_size * per_row
        self.block_table = torch.zeros((max_batch_size, per_row), dtype=torch.long, device=device)
        for layer in self.layers.values():
            layer.attention.setup_cache(self.n_blocks, self.block_table, dtype, device)
        self.rope = rope_table(self.args, n_ctx).to(device)
        self.max_batch_size, self.n_ctx = max_batch_size, n_ctx
        if self.n_blocks >= max_batch_size * per_row:
            self.own_blocks()

    def own_blocks(self) -> None:
        """Give every cache row blocks of its own, one after another (what Meta-style generation, perplexity and
        benchmarks address: rows 0..B-1, each up to n_ctx), after a server's sharing."""
        rows, per_row = self.block_table.shape
        if self.n_blocks < rows * per_row:
            raise ValueError(f"The KV cache holds {self.n_blocks * KV_BLOCK} tokens (kv_tokens), fewer than {rows} "
                             f"rows of {self.n_ctx}: only the serving engine shares such a cache out; load without "
                             "kv_tokens to generate here.")
        self.block_table.copy_(torch.arange(rows * per_row, device=self.block_table.device).view(rows, per_row))

    def assign_blocks(self, entries: list[tuple[int, int, int]]) -> None:
        """Set block table entries (cache row, index in its row, block), in one copy to the device that does not
        wait for it."""
        if entries:
            rows, index, blocks = to_device(entries, self.block_table.device).unbind(1)
            self.block_table.view(-1)[rows * self.block_table.shape[1] + index] = blocks

    @torch.no_grad()  # not inference_mode: its tensors cannot enter a compiled graph
    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor, slots: Slots = None,
                length: int | None = None, last_only: bool = False, hidden: bool = False) -> torch.Tensor:
        """x: tokens [B, S] (first stage) or the previous stage's hidden state [B, S, dim], placed at start_pos..
        (an int for all rows, or a tensor [B] per row). Returns the hidden state after these layers or, on the
        last stage, float32 logits over the full vocabulary (of each row's final position only, if last_only),
        or with hidden=True the final normed hidden state [B, S, dim] in float32 (what embeddings pool).

        slots: cache rows per batch row (None: rows 0..B-1). length: how much of the cache to attend to;
        defaults to the end of the furthest row (a compiled step passes a fixed window).
        """
        pos, mask, length = self.placement(x.shape[:2], x.device, start_pos, slots, length)
        h = self.tok_embeddings(x).to(self.act_dtype) if self.is_first else x  # int8 tables give fp32
        h = self.run_layers(h, pos, self.rope[pos], mask, slots, length)
        if not self.is_last:
            return h
        if last_only and isinstance(slots, Packed):  # each final sequence's last token
            h = h[:, slots.finals]
        elif last_only:
            h = h[:, -1:]
        return self.norm(h).float() if hidden else self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and the output projection: float32 logits."""
        return self.output(self.norm(h)).float()

    def run_layers(self, h: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                   slots: Slots, length: int) -> torch.Tensor:
        """This stage's blocks, in order (kernels may run a decode step's blocks in one call)."""
        for layer in self.layers.values():
            h = layer(h, pos, rope, mask, slots, length)
        return h

    def placement(self, shape: tuple[int, ...], device: torch.device, start_pos: int | torch.Tensor,
                  slots: Slots, length: int | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Each token's position, the attention mask (None where a row sees the whole window) and the
        cache length attended to."""
        bsz, seqlen = shape
        if isinstance(slots, Packed):
            if bsz != 1:
                raise ValueError(f"Packed sequences are one row of tokens, not {bsz}.")
            check_packed(slots.slots, slots.starts, slots.lengths, seqlen, self.max_batch_size, self.n_ctx)
            return slots.positions[None], None, max(s + n for s, n in zip(slots.starts, slots.lengths))
        if isinstance(start_pos, int):
            end = start_pos + seqlen
            pos = (start_pos + torch.arange(seqlen, device=device)).expand(bsz, seqlen)
        else:
            pos = start_pos.view(bsz, 1)
            pos = pos if seqlen == 1 else pos + torch.arange(seqlen, device=device)
            end = None
        if length is None:
            length = end if end is not None else int(pos.max()) + 1
        if length > self.n_ctx or (slots is None and bsz > self.max_batch_size):
            raise ValueError(f"{bsz} x {length} tokens exceed the cache ({self.max_batch_size} x "
                             f"{self.n_ctx}); raise max_batch_size / n_ctx.")
        # no mask where each row sees the whole window, or the attention kernels read each row up to its position
        unmasked = seqlen == 1 and (end == length or self.decodes_by_position)
        return pos, None if unmasked else visible(pos, length), length
