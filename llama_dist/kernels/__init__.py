"""Faster kernels, installed once after loading as a transform over the plain model (the way gpt-fast
applies tensor parallelism): modules are swapped for ones that compute the same thing in fewer,
faster kernels. What to install is a Kernels value, chosen once per run; nothing is re-read per call.

- attention "cpu": a decoded token's attention as two fp32 matmuls (CPUs; cheaper than SDPA's set-up);
  "cpp": on CPUs, rotary + cache write + attention in one C++ call per layer (csrc/decode_attention.cpp;
  prompts keep SDPA); "triton": the same in one CUDA kernel per layer
  (decode_attention.py); "sdpa": the model's own. On GPUs, prompts' SDPA never takes cuDNN's backend (set
  for the process when a model is given its kernels): it builds a plan per new shape, 1-2 s each, and a
  server's prompt chunks come in many shapes.
- gemv: one decoded row's projections (dense, int8, int4 groups of 32) through our Triton matrix-vector kernel,
  with the block's RMSNorm, SwiGLU and residual adds folded in (gemv.py); on CPUs a decode step's projections
  (any rows) through the C++ block kernels with the same folds (csrc/block_matmul.cpp), where the weights are in
  their block formats.
  On CPUs the two make a decode step a few C++ calls per layer instead of dozens of PyTorch operations, and
  in one process one C++ call for all the blocks (CppDecodeTransformer).
- row_kernels: a decode step of several rows, and a prompt pass, runs its RMSNorms, SwiGLU and rotary
  embedding (with the cache write) as one Triton kernel each (rows.py), not PyTorch's six, three and two
  dozen; packed prompt chunks attend in one Triton kernel (packed_attention.py, where it loads), not an
  SDPA call each, so a prompt pass can be replayed from a CUDA graph (runner/graphs.py).
- symm_mem: tensor-parallel ranks decoding one row through the one-row kernels sum their partial products in
  those kernels, through peer slots in symmetric memory (PeerReducedTransformer), not by all-reduces between
  them; compiled CUDA graphs all-reduce through a symmetric-memory one-shot (the runner asks the communicator).
- batch_invariant: on CUDA, a row's results the same whatever shares its batch (invariant.py): dense products
  through one fixed-tile matmul, norms through the row kernel, no one-row kernel; a server then does not fold
  decode rows into prompt passes. On CPUs the block kernels of quantized weights already are; dense weights are
  refused there (generation/llama.py's load_runner asks invariant.check_without_kernels).
- quantized: int8 and int4 weights multiply through our Triton kernels (quant_matmul.py: one row; int8's few
  rows on tensor cores, converting the weights in registers; a prompt's rows through the matrix dequantized by
  one kernel, then cuBLAS) instead of a converted copy made by several PyTorch operations or PyTorch's int4
  kernel; off with the matmul kernel's setting (LLAMA_DIST_GEMV=0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import csrc
from ..distributed.settings import Settings, read_settings
from ..model.transformer import RMSNorm, Transformer
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, ShardedWeight
from ..quant.weights import Int4Weight, Int8Weight
from . import decode_attention, gemv, invariant, packed_attention, quant_matmul, rows
from .fused import (CppDecodeTransformer, CpuDecodeAttention, FusedTransformer, FusedTransformerBlock,
                    PeerReducedTransformer, TritonPromptAttention)

ATTENTION_CHOICES = ("sdpa", "cpu", "cpp", "triton")


@dataclass(frozen=True)
class Kernels:
    attention: str = "sdpa"  # one of ATTENTION_CHOICES
    gemv: bool = False
    symm_mem: bool = False
    row_kernels: bool = False
    quantized: bool = False
    batch_invariant: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention kernels {self.attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}.")
        if self.batch_invariant and (self.attention != "triton" or self.gemv or self.symm_mem
                                     or not self.row_kernels or self.quantized):
            raise ValueError("batch-invariant kernels: the Triton attention and row kernels, and neither the "
                             "one-row nor the quantized kernels nor peer slots.")


def choose_kernels(device: torch.device, settings: Settings | None = None, batch_invariant: bool = False) -> Kernels:
    """The fastest kernels this device and this installation have, less what the settings switch off;
    batch_invariant: on CUDA, those whose rows do not depend on their batch (invariant.py)."""
    settings = settings or read_settings()
    if device.type == "cuda" and batch_invariant:
        if not (decode_attention.load() and invariant.load()):
            raise RuntimeError("Batch-invariant kernels need Triton (and a GPU of compute capability 8.0+).")
        return Kernels("triton", row_kernels=True, batch_invariant=True)
    if device.type == "cuda":
        triton_attention = settings.attention and decode_attention.load()
        use_gemv = settings.gemv and gemv.load()
        return Kernels("triton" if triton_attention else "sdpa", use_gemv, settings.symm_mem,
                       row_kernels=use_gemv and rows.load(), quantized=use_gemv and quant_matmul.load())
    if device.type == "cpu":
        built = csrc.available()
        return Kernels("cpp" if built and settings.attention else "cpu", gemv=built and settings.gemv)
    return Kernels("sdpa")


def install(model: Transformer, kernels: Kernels) -> Transformer:
    """Give the model's modules the chosen kernels, in place (parameters, caches and names unchanged)."""
    if kernels.attention == "triton" and not decode_attention.load():
        raise RuntimeError("The Triton decode-attention kernel needs Triton (and a GPU of compute capability 8.0+).")
    on_cpu = gemv.on_cpp_kernels(model.device)
    if (kernels.attention == "cpp" or (kernels.gemv and on_cpu)) and not csrc.available():
        raise RuntimeError("The C++ CPU kernels could not be built (they need a C++ compiler and ninja).")
    if ((kernels.gemv and not on_cpu and not gemv.load()) or (kernels.row_kernels and not rows.load())
            or (kernels.quantized and not quant_matmul.load()) or (kernels.batch_invariant and not invariant.load())):
        raise RuntimeError("The Triton matmul and row kernels need Triton.")
    if kernels.batch_invariant and any(getattr(m, "qweight", None) is not None for m in model.modules()):
        raise ValueError("Batch-invariant products are for dense weights: load with --quantize none.")
    if model.device.type == "cuda" and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    for block in model.layers.values():
        head_dim = block.attention.head_dim
        if kernels.batch_invariant and not decode_attention.supports(head_dim):
            raise ValueError(f"Batch-invariant decoding needs the decode-attention kernel, which does not take "
                             f"heads of {head_dim}.")
        if kernels.attention in ("cpu", "cpp"):
            _specialise(block.attention, CpuDecodeAttention)
        elif kernels.row_kernels and packed_attention.load() and decode_attention.supports(head_dim):
            _specialise(block.attention, TritonPromptAttention)
        attention_kernel = ((kernels.attention == "triton" and decode_attention.supports(head_dim))
                            or (kernels.attention == "cpp" and decode_attention.supports(head_dim, "cpu")))
        if kernels.gemv or attention_kernel or kernels.row_kernels:
            _specialise(block, FusedTransformerBlock).configure(kernels.gemv, attention_kernel, kernels.row_kernels,
                                                                kernels.batch_invariant)
    if any(isinstance(b, FusedTransformerBlock) for b in model.layers.values()):
        _specialise(model, FusedTransformer).configure(kernels.gemv and model.is_last, kernels.row_kernels)
    if kernels.batch_invariant:
        for layer in model.modules():
            if type(layer) is ColumnParallelLinear:
                _specialise(layer, invariant.InvariantColumnParallelLinear)
            elif type(layer) is RowParallelLinear:
                _specialise(layer, invariant.InvariantRowParallelLinear)
        if model.is_last and type(model.norm) is RMSNorm:
            _specialise(model.norm, invariant.RowKernelRMSNorm)
    if on_cpu and CppDecodeTransformer.runs(model):
        _specialise(model, CppDecodeTransformer).configure()
    for layer in model.modules():
        weight = layer.qweight if isinstance(layer, ShardedWeight) else None
        if kernels.quantized and type(weight) is Int8Weight:  # (a tied one is seen twice)
            _specialise(weight, quant_matmul.TritonInt8Weight)
        elif kernels.quantized and type(weight) is Int4Weight and weight.gemv_operands() is not None:
            _specialise(weight, quant_matmul.TritonInt4Weight)
        elif type(weight) is Int4Weight:
            weight.pack_for_pytorch()
    if kernels.symm_mem and kernels.gemv and not on_cpu and PeerReducedTransformer.runs(model):
        peer = model.comm.peer_slots(2 * len(model.layers), model.args.dim, model.act_dtype, model.device)
        if peer is not None:
            _specialise(model, PeerReducedTransformer).configure(peer)
    return model


def _specialise(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """The same module (parameters, caches, names) with the methods of `cls`, a subclass adding only behaviour."""
    assert issubclass(cls, type(module)) and cls.__init__ is type(module).__init__, cls
    module.__class__ = cls
    return module

