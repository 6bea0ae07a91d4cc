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
    assert result["hf_eager_decode_b1"] > 0 and result["hf_eager_decode_b2"] > 0  # HF at our batch sizes, same run
    # 3 warm-up steps and 4 timed ones; each step's top two logits, the first no smaller than the second
    assert len(result["greedy_b1"]) == len(result["top2_b1"]) == 7
    assert all(top >= second for top, second in result["top2_b1"])


def test_load_speed_benchmark_reports_read_and_load(tmp_path):
    """benchmarks/load_speed.py writes a Meta checkpoint, then times reading its files and loading it."""
    out = subprocess.run([sys.executable, "benchmarks/load_speed.py", "--config", "tiny-gqa", "--dir",
                          str(tmp_path / "ckpt"), "--mp", "2", "--device", "cpu", "--reps", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["checkpoint_shards"] == 2 and result["file_bytes"] > 100_000
    assert result["read_gbs"] > 0 and result["load_to_device_gbs"] > 0
    assert result["load_fraction_of_read_speed"] == result["read_s"] / result["load_s"]
