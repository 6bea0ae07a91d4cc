"""Our torch dequantizers equal the gguf package's reference numpy ones on random blocks of every type."""
import zlib

import numpy as np
import pytest
import torch

from llama_dist.quant.ggml import AS_Q4_1, BLOCK_TYPES, as_q4_1_rows, dequantize_rows

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


@pytest.mark.parametrize("type_name", list(AS_Q4_1))
def test_4_bit_types_become_q4_1_blocks_of_the_same_values(type_name):
    """Q4_0 exactly; Q4_K's per-group products d * scale and dmin * min rounded to fp16 as Q4_1 stores them."""
    block, size, _ = BLOCK_TYPES[type_name]
    rng = np.random.default_rng(zlib.crc32(type_name.encode()))
    raw = rng.integers(0, 256, size=(6, 8 * size), dtype=np.uint8)
    head = 2 if type_name == "Q4_0" else 4  # fp16 scales (and mins) in range, never inf or NaN
    raw.reshape(6, 8, size)[..., :head] = rng.uniform(0.01, 1, (6, 8, head // 2)).astype(np.float16).view(np.uint8)
    raw = torch.from_numpy(raw)
    expected = dequantize_rows(raw, type_name)
    got = dequantize_rows(as_q4_1_rows(raw, type_name), "Q4_1")
    assert got.shape == expected.shape == (6, 8 * block)
    if type_name == "Q4_K":
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-3
    else:
        assert torch.equal(got, expected)
