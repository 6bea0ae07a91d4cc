"""One decoded token's matrix-vector products on CUDA, in Triton: y = x W^T for a single row x,
with the layer's neighbouring element-wise work folded in.

Batch-1 decoding reads every weight once per token, so its speed is the read bandwidth these
products reach, which general matmuls (cuBLAS, inductor's reductions) fall short of for one row
(benchmarks/RESULTS.md, "Fused decode kernels"). This kernel streams W in [BLOCK_N, BLOCK_K] tiles with
pipelined loads and sum in fp32. W is dense, int8 (one scale per row), or int4 in groups of 32 with a scale and a
zero each: 8 weights per 32-bit word, multiplied against x rounded to int8 per group (in the kernel, per tile) with
dp4a, four products per instruction, each group's scale applied to its integer sum, as llama.cpp's CUDA kernels
do (float conversions took ~4 instructions per weight: RESULTS.md, "Quantized GPU kernels"). Tile sizes are
autotuned per shape; int4's may also share a row's inputs out over several programs (the last adds their parts
in a fixed order), so that matrices of few rows fill the GPU with tall tiles, few programs each resident at once
(rounding x once a step instead of in every program lost: benchmarks/RESULTS.md). The weights are loaded as the
first lines L2 gives up, being read once a step, so that what is read again stays there.

int8 rows whose length is whole groups of 32 are read four weights to a word and multiplied the same way, against
x rounded to int8 per group of 32 (llama.cpp's Q8_0 x Q8_1), the row scale applied to the finished sum: about a
third of the instructions per weight of converting each weight to float (benchmarks/kernel_ptx.py). Other
lengths keep x as it is and convert int8 in registers without the GPU's int-to-float instruction, which runs at a
quarter of the others' rate: a small integer v added to the bits of 2^23 + 2^22 is that float plus v, so one
integer add and one float subtraction give v exactly (`_exact_float`).

On Hopper and later GPUs the products and the decode attention are launched as programmatic dependents: each
starts while the kernel before it ends, streams its first tile of weights, and waits (griddepcontrol) only
before reading what that kernel wrote, so a step's ~190 launches do not each leave the GPU idle between them.

A decode step's other kernels (RMSNorm, SwiGLU, residual adds) each cost a launch and a few
microseconds for a few kilobytes; here they cost nothing:
- RMSNorm before the product: x * g per column as x streams in, its sum of squares in the same loop,
  and the 1/rms factor applied to the finished sums (it is one scalar per row of x);
- SwiGLU: x holds [gate, up] and the product's input is silu(gate) * up, computed as it streams;
- a residual added to the output.
"""
from __future__ import annotations

import functools
import os

import torch

from ..distributed.peer_memory import PeerSum

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: how CI checks our kernels


def on_cpp_kernels(device: torch.device) -> bool:
    """Whether the device's kernels are our C++ CPU ones (csrc/), not Triton's: CPUs, except under Triton's
    interpreter, where CPU tensors stand for a GPU's."""
    return device.type == "cpu" and not INTERPRETED


def bf16_tensor_cores() -> bool:
    """Whether attention kernels' bf16 tensor-core products (tl.dot) run here: GPUs from Ampere (sm_80) on, or
    Triton's interpreter; without a GPU, where the kernels are not used, this does not object."""
    return INTERPRETED or not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0)


@functools.cache
def load() -> bool:
    """Define the kernels and their ops when a model is given them (importing Triton takes seconds, which CPU
    runs should not pay). False where Triton is missing (the dense and packed paths serve)."""
    try:
        from . import gemv_triton  # noqa: F401  (registers llama_dist::gemv)
    except ImportError:
        return False
    return True


def gemv(x: torch.Tensor | PeerSum, w: torch.Tensor, scales: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False,
         residual: torch.Tensor | PeerSum | None = None, into: PeerSum | None = None,
         fp32_out: bool = False) -> torch.Tensor | PeerSum:
    """x [..., in] with one row -> [..., out]: x W^T, times `scales` per output row for int8 W.

    norm_weight: RMS-normalise x first (with eps); gated: x is [gate, up] and the input silu(gate) * up;
    residual [..., out]: added to the result; fp32_out: the result in float32 (logits), not x's dtype. Across
    tensor-parallel ranks (distributed/peer_memory.py), x and residual may be sums still in peer slots, and `into`
    sends this rank's part of the result to the slots of a site (returned as the sum it will be)."""
    peer = next((p.peer for p in (x, residual, into) if isinstance(p, PeerSum)), None)
    if peer is not None:
        from .gemv_triton import gemv_peers

        y = gemv_peers(_row(x), w, scales, norm_weight, _row(residual), eps, gated, peer, _site(x),
                       _site(residual), _site(into), peer.slots.dtype)
        return into if into is not None else y.reshape(1, 1, -1)
    flat = x.reshape(1, -1)
    y = torch.ops.llama_dist.gemv(
        flat, w, flat if scales is None else scales, flat if norm_weight is None else norm_weight,
        flat if residual is None else residual.reshape(1, -1), eps,
        scales is not None, norm_weight is not None, gated, residual is not None, fp32_out)
    return y.reshape(*x.shape[:-1], -1)


def _row(value: torch.Tensor | PeerSum | None) -> torch.Tensor | None:
    return value.reshape(1, -1) if isinstance(value, torch.Tensor) else None


def _site(value: torch.Tensor | PeerSum | None) -> int | None:
    return value.site if isinstance(value, PeerSum) else None


def peer_sum(value: PeerSum) -> torch.Tensor:
    """The sum as a tensor [1, 1, dim], once every rank's part has arrived."""
    from .gemv_triton import peer_sum as sum_slots

    return sum_slots(value.peer, value.site).reshape(1, 1, -1)
