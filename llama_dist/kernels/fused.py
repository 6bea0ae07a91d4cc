"""The modules kernels.install swaps in: each computes what the model's own module computes
(tests/test_gpu_kernels.py compares them), in fewer or faster kernels for a decoded token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed.peer_memory import PeerSlots, PeerSum
from ..model.transformer import Attention, Packed, RMSNorm, Slots, Transformer, TransformerBlock, cache_rows
from ..parallel.layers import RowParallelLinear, ShardedWeight
from . import decode_attention, gemv, packed_attention, rows

class CpuDecodeAttention(Attention):
    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """A decoded token's attention (a few query rows) as two fp32 matmuls: for so little work the CPU
        flash kernel's set-up costs more than the arithmetic, and bf16 matmuls on CPUs without bf16 units
        are slower than converting. Prompts keep SDPA.

        Rows at different positions (a mask) attend row by row over exactly the positions each sees, so a
        row's arithmetic (the lengths its sums run over) is what it would be alone: an answer does not depend
        on the other requests in the batch. Masked-out positions, even weighted zero, would change how the
        sums group, and 8-bit activation rounding downstream can turn that last bit into another token.
        (A compiled step attends over a fixed window with the mask instead: one graph for all lengths.)"""
        if q.shape[2] > self.n_rep:  # more than one token per row
            return super().attend(q, keys, values, mask)
        if mask is None or torch.compiler.is_compiling():
            return _attention_fp32(q, keys, values, mask)
        visible = mask[:, 0, 0].sum(-1).tolist()  # decode masks are "up to pos": a prefix per row
        return torch.cat([_attention_fp32(q[b:b + 1], keys[b:b + 1, :, :n], values[b:b + 1, :, :n])
                          for b, n in enumerate(visible)])


class TritonPromptAttention(Attention):
    """A prompt's rotary embedding and cache write in one Triton kernel (rows.py) instead of two dozen small
    operations, and packed sequences' attention in one more (packed_attention.py) instead of a loop of SDPA
    calls: a prompt pass on a GPU pays for those in CPU time, and a CUDA graph can hold the kernels."""

    def cached_attention(self, qkv: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                         slots: Slots, length: int) -> torch.Tensor:
        if not isinstance(slots, Packed):
            return super().cached_attention(qkv, pos, rope, mask, slots, length)
        q = self.rotate_and_cache(qkv, pos, rope, slots)
        out = packed_attention.packed_attention(q[0], self.cache_k, self.cache_v, self.block_table, slots.rows,
                                                slots.positions, slots.runs)
        return out[None]

    def rotate_and_cache(self, qkv: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, slots: Slots) -> torch.Tensor:
        bsz, seqlen, _ = qkv.shape
        rows_of = slots.rows[None] if isinstance(slots, Packed) else cache_rows(slots, bsz, qkv.device).view(
            bsz, 1).expand(bsz, seqlen)
        return rows.rope_and_cache(qkv, rope, self.cache_k, self.cache_v, self.block_table, rows_of,
                                   pos.expand(bsz, seqlen), self.n_local_heads)


def _attention_fp32(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    scores = (q.float() @ keys.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ values.float()).type_as(q)


def fused_linear(layer: ShardedWeight, x: torch.Tensor | PeerSum, use_gemv: bool, norm: RMSNorm | None = None,
                 gated: bool = False, residual: torch.Tensor | PeerSum | None = None,
                 row_kernels: bool = False, into: PeerSum | None = None,
                 fp32_out: bool = False) -> torch.Tensor | PeerSum:
    """residual + (this shard's product with norm(x), or with silu(gate) * up of x = [gate, up] when gated):
    in one kernel where one reads the weight (on CUDA the one-row Triton kernel, for one row, which writes float32
    if fp32_out; on CPUs the C++ block kernels, for any rows), else step by step (the norm and SwiGLU in a Triton
    kernel each with row_kernels). Sums still in peer slots (x, residual) and `into` take the one-row kernel, which
    reads and writes them (PeerReducedTransformer.runs checks that every projection has it)."""
    fold = {} if norm is None else {"norm_weight": norm.weight, "eps": norm.eps}
    peers = isinstance(x, PeerSum) or isinstance(residual, PeerSum) or into is not None
    if use_gemv and not peers and gemv.on_cpp_kernels(x.device):
        y = None if layer.qweight is None else layer.qweight.folded(x, gated=gated, residual=residual, **fold)
        if y is not None:
            return y
    elif use_gemv and (peers or x.numel() == x.shape[-1]):
        operands = layer.gemv_operands()
        if operands is not None:
            return gemv.gemv(x, *operands, gated=gated, residual=residual, into=into, fp32_out=fp32_out, **fold)
    if norm is not None:
        x = rows.rms_norm(x, norm.weight, norm.eps) if row_kernels else norm(x)
    if gated:
        if row_kernels:
            x = rows.silu_mul(x)
        else:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
    y = ShardedWeight.local_linear(layer, x)
    return y if residual is None else residual + y


class FusedTransformerBlock(TransformerBlock):
    """The block of a decode step (one token per row): norms, SwiGLU and residuals folded into the projections'
    kernels (residuals added by tensor-parallel rank 0 before the all-reduce, so no rank runs another
    kernel after it), and attention in one kernel (decode_attention: Triton on CUDA, C++ on CPUs). Prompts
    (packed ones too) take the plain block, with the norms and SwiGLU as row kernels where those are installed."""

    def configure(self, use_gemv: bool, attention_kernel: bool, row_kernels: bool = False,
                  batch_invariant: bool = False) -> None:
        self.use_gemv, self.attention_kernel, self.row_kernels = use_gemv, attention_kernel, row_kernels
        self.batch_invariant = batch_invariant

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                slots: Slots, length: int) -> torch.Tensor:
        attention, ffn = self.attention, self.feed_forward
        if x.shape[1] != 1 or isinstance(slots, Packed):  # a prompt
            if not self.row_kernels:
                return super().forward(x, pos, rope, mask, slots, length)
            normed = rows.rms_norm(x, self.attention_norm.weight, self.attention_norm.eps)
            h = x + attention.wo(attention.cached_attention(attention.wqkv(normed), pos, rope, mask, slots, length))
            return h + ffn.w2(rows.silu_mul(ffn.w13(rows.rms_norm(h, self.ffn_norm.weight, self.ffn_norm.eps))))
        return self.decode(x, pos, rope, mask, slots, length)

    def decode(self, x: torch.Tensor | PeerSum, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
               slots: Slots, length: int, peer: PeerSlots | None = None,
               sites: tuple[int, int] = (0, 1)) -> torch.Tensor | PeerSum:
        """One token per row. With peer slots (one row; PeerReducedTransformer) the two row-parallel products
        go to the slots of `sites` instead of through all-reduces, and x may be such a sum."""
        attention, ffn = self.attention, self.feed_forward
        qkv = fused_linear(attention.wqkv, x, self.use_gemv, norm=self.attention_norm, row_kernels=self.row_kernels)
        if self.attention_kernel:  # one token per row: its mask is always "up to pos"
            cache_row = cache_rows(slots, qkv.shape[0], qkv.device)
            out = decode_attention.decode_attention(qkv, rope, attention.cache_k, attention.cache_v,
                                                    attention.block_table, cache_row, pos[:, 0], attention.n_rep,
                                                    self.batch_invariant, length)
        else:
            out = attention.cached_attention(qkv, pos, rope, mask, slots, length)
        into = (None, None) if peer is None else (PeerSum(peer, sites[0]), PeerSum(peer, sites[1]))
        h = self._reduce(attention.wo, out, residual=x, into=into[0])
        gate_up = fused_linear(ffn.w13, h, self.use_gemv, norm=self.ffn_norm, row_kernels=self.row_kernels)
        return self._reduce(ffn.w2, gate_up, gated=True, residual=h, into=into[1])

    def _reduce(self, layer: RowParallelLinear, x: torch.Tensor, residual: torch.Tensor | PeerSum,
                gated: bool = False, into: PeerSum | None = None) -> torch.Tensor | PeerSum:
        """residual + the row-parallel layer's product, summed over the ranks (in the kernels that read it, when
        it goes `into` peer slots)."""
        mine = residual if layer.comm.rank == 0 else None
        y = fused_linear(layer, x, self.use_gemv, gated=gated, residual=mine, row_kernels=self.row_kernels,
                         into=into)
        return y if into is not None else layer.comm.all_reduce(y)


class FusedTransformer(Transformer):
    """A model of FusedTransformerBlocks. A decoded token builds no attention mask where every block's attention
    kernel reads each row's cache up to the row's position; with the one-row kernels (or on CPUs the C++ block
    kernels) the final RMSNorm is folded into the output projection's kernel, as the blocks' norms are into
    theirs, which writes the logits in float32. A decode step then launches, besides its blocks, the embedding and
    rotary lookups and that kernel."""

    def configure(self, use_gemv: bool, row_kernels: bool) -> None:
        self.use_gemv, self.row_kernels = use_gemv, row_kernels
        self.decodes_by_position = all(isinstance(b, FusedTransformerBlock) and b.attention_kernel
                                       for b in self.layers.values())

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if not self.use_gemv:
            return super().logits(h)
        y = fused_linear(self.output, h, use_gemv=True, norm=self.norm, row_kernels=self.row_kernels, fp32_out=True)
        return self.output.finish(y).float()  # (float32 already where the one-row kernel wrote it)


class PeerReducedTransformer(FusedTransformer):
    """Tensor-parallel ranks on GPUs of one host decoding one row: each block's two row-parallel products leave
    their parts in peer slots (distributed/peer_memory.py) and the kernel that reads the sum next adds them, so a
    layer runs the five kernels it runs in one process, with no all-reduce between them. Batches, prompts and
    compiled steps keep the all-reduces."""

    def configure(self, peer: PeerSlots) -> None:
        self.peer = peer

    @staticmethod
    def runs(model: Transformer) -> bool:
        """Whether every block is a fused one whose projections all take the one-row kernel."""
        return model.comm.world_size > 1 and all(
            isinstance(b, FusedTransformerBlock) and b.use_gemv
            and all(p.gemv_operands() is not None for p in _projections(b))
            for b in model.layers.values())

    def run_layers(self, h: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                   slots: Slots, length: int) -> torch.Tensor:
        if h.shape[:2] != (1, 1) or isinstance(slots, Packed) or torch.compiler.is_compiling():
            return super().run_layers(h, pos, rope, mask, slots, length)
        self.peer.next_step()
        for i, block in enumerate(self.layers.values()):
            h = block.decode(h, pos, rope, mask, slots, length, self.peer, (2 * i, 2 * i + 1))
        return gemv.peer_sum(h)


class CppDecodeTransformer(FusedTransformer):
    """One process on a CPU, every block's weights in the C++ kernels' formats: a decode step runs all of this
    stage's blocks in one C++ call (csrc/decode_step.cpp), the same kernels in the same order as
    FusedTransformerBlock's calls, so the same results without Python between them. Prompts, and steps being
    compiled, take the blocks one by one."""

    def configure(self) -> None:
        blocks = list(self.layers.values())
        operands = [layer.qweight.block_operands() for b in blocks for layer in _projections(b)]
        self.step_formats, self.step_weights, self.step_sizes = (list(t) for t in zip(*operands))
        self.step_norms = [n.weight for b in blocks for n in (b.attention_norm, b.ffn_norm)]
        self.n_rep, self.norm_eps = blocks[0].attention.n_rep, blocks[0].attention_norm.eps

    @staticmethod
    def runs(model: Transformer) -> bool:
        """Whether every block is a fused one with the C++ attention and block-format weights, in one process."""
        return model.comm.world_size == 1 and all(
            isinstance(b, FusedTransformerBlock) and b.use_gemv and b.attention_kernel
            and all(p.qweight is not None and p.qweight.block_operands() is not None for p in _projections(b))
            for b in model.layers.values())

    def run_layers(self, h: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                   slots: Slots, length: int) -> torch.Tensor:
        if h.shape[1] != 1 or isinstance(slots, Packed) or torch.compiler.is_compiling():
            return super().run_layers(h, pos, rope, mask, slots, length)
        caches = [c for b in self.layers.values() for c in (b.attention.cache_k, b.attention.cache_v)]
        return torch.ops.llama_dist.decode_blocks(
            h, self.step_weights, self.step_formats, self.step_sizes, self.step_norms, caches, rope,
            self.block_table, cache_rows(slots, h.shape[0], h.device), pos[:, 0], self.n_rep, self.norm_eps)


def _projections(block: TransformerBlock) -> tuple[ShardedWeight, ...]:
    """A block's four projections in the order csrc/decode_step.cpp takes their weights."""
    return block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2
