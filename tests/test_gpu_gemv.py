"""The CUDA one-row matmul kernel (Triton), run by Triton's CPU interpreter: CI has no GPU.

Its speed is a GPU-only question (benchmarks/gemv_kernels.py); here: the values, with masked edges
(an input length that is not a multiple of the tile, fewer rows than a tile), dense and int8, and the work it
folds in (RMSNorm of the input, SwiGLU of a [gate, up] input, a residual) against the model's own modules."""
import os
import subprocess
import sys

import pytest

from .helpers import ROOT

pytest.importorskip("triton")

SCRIPT = """
import torch
from llama_dist.quant.gpu_gemv import gemv, load
assert load()
from llama_dist.quant.weights import int8_quantize
from llama_dist.model.transformer import RMSNorm
g = torch.Generator().manual_seed(0)
for n, k in ((40, 288), (3, 64), (17, 1000)):
    x, w = torch.randn(1, 1, k, generator=g), torch.randn(n, k, generator=g)
    y = gemv(x, w)
    assert y.shape == (1, 1, n), y.shape
    assert (y - x @ w.t()).abs().max() < 1e-4 * (x @ w.t()).abs().max(), (n, k)
    q, s = int8_quantize(w)
    ref = x @ (q.float() * s[:, None]).t()
    assert (gemv(x, q, s) - ref).abs().max() < 1e-4 * ref.abs().max(), (n, k)
    norm = RMSNorm(k, 1e-5)
    norm.weight.copy_(torch.rand(k, generator=g) + 0.5)
    ref = norm(x * 3) @ w.t()
    y = gemv(x * 3, w, norm_weight=norm.weight, eps=norm.eps)
    assert (y - ref).abs().max() < 1e-4 * ref.abs().max(), (n, k)
    gate_up, r = torch.randn(1, 1, 2 * k, generator=g), torch.randn(1, 1, n, generator=g)
    ref = r + (torch.nn.functional.silu(gate_up[..., :k]) * gate_up[..., k:]) @ (q.float() * s[:, None]).t()
    y = gemv(gate_up, q, s, gated=True, residual=r)
    assert (y - ref).abs().max() < 1e-4 * ref.abs().max(), (n, k)
print("ok")
"""


def test_gemv_kernel_in_the_interpreter():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


MODEL_SCRIPT = """
import os
import torch
from llama_dist.checkpoint.loader import load_model
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.distributed.context import init_distributed
from llama_dist.model.args import ModelArgs
from llama_dist.quant.gpu_gemv import load
from tests.helpers import TINY_GQA, random_state_dict
assert load()
args = ModelArgs(**TINY_GQA)
ctx = init_distributed(backend="gloo")
tokens = torch.tensor([[5, 17, 99, 3, 250, 7]])
# int8: the CPU path rounds activations to the scales' dtype (bf16) first, the kernel sums in fp32
for quantize, tolerance in (("none", 1e-5), ("int8", 1e-2)):
    model = load_model(StateDictSource(args, random_state_dict(args)), ctx, dtype=torch.float32, max_seq_len=16,
                       max_batch_size=1, progress=False, quantize=quantize)
    logits = {}
    for kernel in ("1", "0"):  # one decoded row at a time: the kernel's path, then the step-by-step one
        os.environ["LLAMA_DIST_GEMV"] = kernel
        logits[kernel] = torch.cat([model(tokens[:, i:i + 1], i) for i in range(tokens.shape[1])], dim=1)
    err = (logits["1"] - logits["0"]).abs().max() / logits["0"].abs().max()
    assert err < tolerance, (quantize, err)
print("ok")
"""


def test_model_decodes_the_same_through_the_kernel():
    """Every projection of a one-row decode step through the kernel (norms, SwiGLU and residuals folded in)
    gives the logits of the step-by-step path, dense and int8."""
    out = subprocess.run([sys.executable, "-c", MODEL_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
