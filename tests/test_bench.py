"""`llama-dist bench` on CPU: every figure present and sane, greedy tokens and their top-two logits recorded."""
import json
import subprocess
import sys

from .helpers import ROOT


def test_bench_prints_decode_prefill_ceiling_and_hf_figures():
    out = subprocess.run([sys.executable, "-m", "llama_dist.cli", "bench", "--config", "configs/tiny-gqa.json",
                          "--batches", "1,2", "--steps", "4", "--prefill", "32", "--compile", "False"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    for key in ("decode_b1_tok_s", "decode_b2_tok_s", "prefill_tok_s", "ceiling_tok_s", "read_bandwidth_gbs"):
        assert result[key] > 0, key
    assert 0 < result["b1_fraction_of_ceiling"] == result["decode_b1_tok_s"] / result["ceiling_tok_s"]
    assert any(key.startswith("hf_") for key in result), sorted(result)  # HF transformers in the same run
    # 3 warm-up steps and 4 timed ones; each step's top two logits, the first no smaller than the second
    assert len(result["greedy_b1"]) == len(result["top2_b1"]) == 7
    assert all(top >= second for top, second in result["top2_b1"])
