"""Our torch dequantizers equal the gguf package's reference numpy ones on random blocks of every type."""
import zlib

import numpy as np
import pytest
import torch

from llama_dist.quant.ggml import BLOCK_TYPES, dequantize_rows

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402


@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_dequantize_matches_reference(type_name):
    block, size, _ = BLOCK_TYPES[type_name]
    rng = np.random.default_rng(zlib.crc32(type_name.encode()))
    raw = rng.integers(0, 256, size=(6, 8 * size), dtype=np.uint8)
    if type_name == "F32":  # random bytes make NaN floats; use real values for the plain float type
        raw = rng.standard_normal((6, 8)).astype(np.float32).view(np.uint8)
    expected = dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(6, -1)
    ours = dequantize_rows(torch.from_numpy(raw), type_name).numpy()
    assert ours.shape == expected.shape == (6, 8 * block)
    finite = np.isfinite(expected)  # random fp16 scale bytes can be inf/NaN; those must agree too
    assert np.array_equal(finite, np.isfinite(ours))
    assert finite.mean() > 0.5
    np.testing.assert_array_equal(ours[finite], expected[finite])
