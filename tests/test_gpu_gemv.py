"""The CUDA one-row matmul kernel (Triton), run by Triton's CPU interpreter: CI has no GPU.

Its speed is a GPU-only question (benchmarks/gemv_kernels.py); here: the values, with masked edges
(an input length that is not a multiple of the tile, fewer rows than a tile), dense and int8."""
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
g = torch.Generator().manual_seed(0)
for n, k in ((40, 288), (3, 64), (17, 1000)):
    x, w = torch.randn(1, 1, k, generator=g), torch.randn(n, k, generator=g)
    y = gemv(x, w)
    assert y.shape == (1, 1, n), y.shape
    assert (y - x @ w.t()).abs().max() < 1e-4 * (x @ w.t()).abs().max(), (n, k)
    q, s = int8_quantize(w)
    ref = x @ (q.float() * s[:, None]).t()
    assert (gemv(x, q, s) - ref).abs().max() < 1e-4 * ref.abs().max(), (n, k)
print("ok")
"""


def test_gemv_kernel_in_the_interpreter():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
