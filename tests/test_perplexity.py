"""Perplexity of SmolLM2 on the GPL-3 text (about 7,400 tokens): fp32 vs llama.cpp, and the int8/int4 cost."""
import json
from pathlib import Path

import pytest

from llama_dist import Llama
from llama_dist.generation.perplexity import perplexity

FIXTURES = Path(__file__).parent / "fixtures"
TEXT = (FIXTURES / "gpl-3.txt").read_text()
LLAMA_CPP = json.loads((FIXTURES / "llamacpp_smollm2.json").read_text())["perplexity"]


def ppl(quantize: str, dtype: str | None = None) -> dict:
    llama = Llama.build("smollm2", max_seq_len=512, max_batch_size=1, quantize=quantize, dtype=dtype)
    return perplexity(llama, TEXT, n_ctx=LLAMA_CPP["ctx"], progress=False)


@pytest.fixture(scope="module")
def fp32():
    return ppl("none", "float32")


def test_fp32_agrees_with_llamacpp(fp32):
    assert fp32["scored_tokens"] == LLAMA_CPP["scored_tokens"] >= 2500  # over 5,000 tokens of text
    assert abs(fp32["ppl"] / LLAMA_CPP["ppl"] - 1) < 0.01, (fp32["ppl"], LLAMA_CPP["ppl"])
    assert 0 < fp32["ppl_error"] < 0.1 * fp32["ppl"]


def test_int8_costs_under_1_percent(fp32):
    assert ppl("int8")["ppl"] < 1.01 * fp32["ppl"]  # measured: +0.8%


def test_int4_g32_costs_under_6_percent(fp32):
    assert ppl("int4")["ppl"] < 1.06 * fp32["ppl"]  # measured: +4.7%
