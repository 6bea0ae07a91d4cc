"""`llama-dist bench` on CPU: every figure present and sane, greedy tokens and their top-two logits recorded."""
import json
import subprocess
import sys

import pytest
import torch

from .helpers import ROOT


def test_bench_prints_decode_prefill_ceiling_and_hf_figures():
    out = subprocess.run([sys.executable, "-m", "llama_dist.cli", "bench", "--config", "configs/tiny-gqa.json",
                          "--batches", "1,2", "--steps", "4", "--prefill", "32", "--compile", "False",
                          "--context", "40"],
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
    assert result["decode_context"] == 40  # decoded after a 40-token prompt


def test_bench_top_two_are_those_of_the_tokens_it_timed():
    """The top two logits are taken in a pass of their own, out of the timing: each step's are still those of the
    steps timed, the logits of one forward pass over the prompt and the tokens the timed steps chose."""
    from llama_dist.bench import decode_tok_s
    from llama_dist.checkpoint.config import LoadConfig
    from llama_dist.checkpoint.source import RandomSource
    from llama_dist.distributed.context import init_distributed
    from llama_dist.generation.llama import load_runner
    from llama_dist.model.args import ModelArgs
    ctx = init_distributed("auto", "cpu")
    args = ModelArgs.from_params_json(ROOT / "configs" / "tiny-gqa.json")
    runner = load_runner(RandomSource(args, ctx.device, torch.float32), ctx,
                         LoadConfig(dtype="float32", n_ctx=64, max_batch_size=1, compile=False), progress=False)
    greedy: list[int] = []
    top2: list[tuple[float, float]] = []
    decode_tok_s(runner, ctx, 1, 5, prompt_len=8, greedy=greedy, top2=top2)
    assert len(greedy) == len(top2) == 8  # 3 warm-up steps and 5 timed ones
    prompt = torch.arange(8) % args.vocab_size  # (the first step is fed the prompt's last token again)
    logits = runner.forward(torch.cat([prompt, prompt[-1:], torch.tensor(greedy[:-1])])[None], 0)[0, 8:]
    assert logits.argmax(-1).tolist() == greedy
    torch.testing.assert_close(torch.tensor(top2), logits.topk(2).values, rtol=1e-5, atol=1e-5)


def test_step_tiles_times_the_tuned_step_through_bench_and_says_when_no_tiles_were_tuned():
    """benchmarks/step_tiles.py on a CPU: its first arm (bench in a process of its own, an empty tile table) runs
    and is timed; with no GPU no one-row tile was tuned, and it says so rather than writing an empty table."""
    out = subprocess.run([sys.executable, "benchmarks/step_tiles.py", "--config", "configs/tiny-gqa.json",
                          "--quantize", "none", "--steps", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "no gemv_int4 tiles taken" in out.stderr, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[0])["tok_s"] > 0


def test_step_ab_captures_each_arm_with_its_settings_and_times_them_all():
    """benchmarks/step_ab.py on a CPU: an arm's settings are in force while its step is captured (its windows) and
    restored after (the next arm's are the tree's); every arm is timed at every context."""
    arm = "short=llama_dist.kernels.decode_attention.WHOLE_L:16"
    out = subprocess.run([sys.executable, "benchmarks/step_ab.py", "--config", "configs/tiny-gqa.json", "--contexts",
                          "(4,12)", "--steps", "6", "--rounds", "1", "--arms", f"('{arm}', 'main=')"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[:2] == ["short: windows [16, 26]", "main: windows [26]"], lines
    result = json.loads(lines[-1])
    assert all(v[0] > 0 for arm in ("short", "main") for v in result["tok_s"][arm].values())
    assert sorted(result["tok_s"]["main"]) == ["12", "4"]


def test_step_ab_refuses_an_arm_that_would_set_nothing(monkeypatch):
    """An arm names a module's constant, or what one holds by attribute and index (a tuner's config); one that
    does not exist, or a setting without a value, is refused rather than timed as the tree under another name."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from step_ab import parse_arm

    from llama_dist.kernels import gemv_triton

    with pytest.raises(ValueError, match="llama_dist.kernels.decode_attention has no WHOLE_LL"):
        parse_arm("typo=llama_dist.kernels.decode_attention.WHOLE_LL:32")
    with pytest.raises(ValueError, match="is not module.NAME"):
        parse_arm("bare=WHOLE_L:32")
    with pytest.raises(ValueError, match="is not module.NAME:value"):
        parse_arm("bare=llama_dist.kernels.decode_attention.WHOLE_L")
    with pytest.raises(ValueError, match=r"gemv_triton._INT4_CONFIGS has no 999"):
        parse_arm("past=llama_dist.kernels.gemv_triton._INT4_CONFIGS[999].maxnreg:96")
    with pytest.raises(ValueError, match=r"_INT4_CONFIGS\[6\] has no max_reg"):
        parse_arm("typo=llama_dist.kernels.gemv_triton._INT4_CONFIGS[6].max_reg:96")
    assert parse_arm("ok=llama_dist.kernels.decode_attention.WHOLE_L:32")[1][0][1:] == ("WHOLE_L", 32)
    (owner, key, value), = parse_arm("cap=llama_dist.kernels.gemv_triton._INT4_CONFIGS[6].maxnreg:96")[1]
    assert owner is gemv_triton._INT4_CONFIGS[6] and (key, value) == ("maxnreg", 96)
    (owner, key, value), = parse_arm("rows=llama_dist.kernels.gemv_triton._INT4_CONFIGS[6].kwargs.BLOCK_N:64")[1]
    assert owner is gemv_triton._INT4_CONFIGS[6].kwargs and (key, value) == ("BLOCK_N", 64)
    with pytest.raises(ValueError, match=r"_INT4_CONFIGS\[6\].kwargs has no BLOCK_M"):
        parse_arm("typo=llama_dist.kernels.gemv_triton._INT4_CONFIGS[6].kwargs.BLOCK_M:64")


def test_step_ab_refuses_arms_it_would_misread(monkeypatch):
    """--arms that fire could not read as a tuple (a quote inside an arm) arrive as one string, which would be
    timed as one arm per character; an arm without a name or with another's name would time the tree under
    another name or replace an arm. Each is refused before the model loads."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from step_ab import parse_arms

    with pytest.raises(ValueError, match="not a tuple of strings"):
        parse_arms("('main=', 'ef=llama_dist.kernels.gemv_triton.WEIGHTS_EVICT_FIRST:'x'')")
    with pytest.raises(ValueError, match="is not name=settings"):
        parse_arms(("main=", "("))
    with pytest.raises(ValueError, match="Two arms are named 'main'"):
        parse_arms(("main=", "main=llama_dist.kernels.decode_attention.WHOLE_L:32"))
    named = parse_arms(("main=", "short=llama_dist.kernels.decode_attention.WHOLE_L:16"))
    assert list(named) == ["main", "short"] and named["main"] == [] and named["short"][0][1:] == ("WHOLE_L", 16)


def test_step_ab_tile_settings_give_matching_keys_a_tile_of_their_own(monkeypatch):
    """"tuner[N=..]:FIELD=v;..." sets, for each key of that tuner matching the first fields, the tile it took with
    the second fields changed (warps and register cap among them; the rest kept); a tuner that has not run, or no
    matching key, is refused."""
    triton = pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from step_ab import TileSetting, capture, parse_arm, resolve

    from llama_dist.kernels import tuning

    @triton.jit
    def kernel(x_ptr, N, K, BLOCK_N: triton.language.constexpr, BLOCK_K: triton.language.constexpr):
        pass

    tuner = tuning.autotune([triton.Config({"BLOCK_N": 32, "BLOCK_K": 1024}, num_warps=4)], ["N", "K"],
                           "test_step_tiles")(kernel)
    try:
        name, (setting,) = parse_arm("w13=test_step_tiles[N=22016]:BLOCK_N=64;num_warps=8;maxnreg=None")
        assert name == "w13" and setting == TileSetting("test_step_tiles", {"N": 22016},
                                                        {"BLOCK_N": 64, "num_warps": 8, "maxnreg": None})
        took = tuner.configs[0]
        tuner.cache.update({(22016, 4096, "torch.bfloat16"): took, (4096, 4096, "torch.bfloat16"): took})
        (owner, key, config), = resolve(setting)
        assert owner is tuner.cache and key == (22016, 4096, "torch.bfloat16")
        assert config.kwargs == {"BLOCK_N": 64, "BLOCK_K": 1024} and config.num_warps == 8
        assert getattr(config, "maxnreg", None) is None and took.kwargs["BLOCK_N"] == 32
        assert len(resolve(parse_arm("k=test_step_tiles[K=4096]:BLOCK_K=512")[1][0])) == 2
        with pytest.raises(ValueError, match="took no tile for a key with"):
            resolve(parse_arm("none=test_step_tiles[N=11008]:BLOCK_N=64")[1][0])
        with pytest.raises(ValueError, match="No tuner 'gemv_int5'"):
            resolve(parse_arm("typo=gemv_int5[N=22016]:BLOCK_N=64")[1][0])
        with pytest.raises(ValueError, match="is not FIELD=value"):
            parse_arm("bad=test_step_tiles[N=22016]:BLOCK_N")
        # in force while an arm's step is captured, the tile it took back after
        seen = []
        monkeypatch.setattr("step_ab.GraphedStep", lambda model, record: seen.append(
            tuner.cache[(22016, 4096, "torch.bfloat16")].kwargs["BLOCK_N"]))
        capture(type("Model", (), {"device": torch.device("cpu")})(), [setting])
        assert seen == [64] and tuner.cache[(22016, 4096, "torch.bfloat16")] is took
    finally:
        tuning._TUNED.pop("test_step_tiles")


def test_bench_refuses_a_context_its_cache_cannot_hold():
    from llama_dist.bench import bench
    with pytest.raises(ValueError, match="must fit --n_ctx 64"):
        bench("configs/tiny-gqa.json", n_ctx=64, steps=8, context=60)


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


def test_kernel_ptx_reads_the_one_row_kernels_loop():
    """benchmarks/kernel_ptx.py compiles the one-row kernel for sm_90 without a GPU: bf16 rows stream in 16-byte
    loads, int4 words through dp4a, and the counts are per weight of the tile."""
    pytest.importorskip("triton")
    results = {}
    for fmt in ("bf16", "int4"):
        out = subprocess.run([sys.executable, "benchmarks/kernel_ptx.py", "--format", fmt, "--block_n", "16",
                              "--block_k", "256", "--warps", "4"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        results[fmt] = json.loads(out.stdout.strip().splitlines()[-1])
    bf16, int4 = results["bf16"], results["int4"]
    # (whatever their cache policy: the weights' loads are evict_first)
    assert sum(n for op, n in bf16["global_loads"].items() if op.endswith(".v4.b32")) > 0
    assert bf16["weights"] == 16 * 256 / 128
    assert int4["counts"].get("dp4a.u32.s32", 0) > 0
    for r in (bf16, int4):
        assert r["per_weight"] == round(r["instructions"] / r["weights"], 2) > 0
        if r["registers"] is not None:  # (ptxas ships in Triton's wheel) what an SM holds at once, by registers
            assert 0 < r["registers"] <= 255 and 1 <= r["programs_per_sm"] <= 64 // 4
            assert r["programs_per_sm"] * 4 * 32 * -(-r["registers"] // 8) * 8 <= 65536
    if int4["sass_per_weight"] is not None:  # (nvdisasm ships in Triton's wheel)
        assert int4["sass_counts"].get("IDP", 0) > 0 and bf16["sass_counts"].get("HFMA2", 0) + \
            bf16["sass_counts"].get("FFMA", 0) > 0 and int4["sass_per_weight"] > 0


def test_gemv_tiles_splits_a_launch_into_fixed_cost_and_streaming(monkeypatch):
    """gemv_tiles.py's line through (bytes, us) of the matrices' best tiles gives back a known launch cost and
    streaming rate, and a matrix off the line moves them."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # (for this test only)
    from gemv_tiles import launch_cost

    sizes = [31_457_280, 10_485_760, 56_360_960, 28_180_480, 81_920_000]  # the 7B int4 matrices' bytes
    assert launch_cost([(b, 3.0 + b / 4.25e6) for b in sizes]) == {"fixed_us": 3.0, "streaming_tb_s": 4.25}
    slow_start = launch_cost([(b, 3.0 + b / 4.25e6 + (2.0 if b < 3e7 else 0.0)) for b in sizes])
    assert slow_start["fixed_us"] > 3.5 and slow_start["streaming_tb_s"] > 4.25


def test_kernel_ptx_reads_the_tensor_core_kernel_swapped_onto_wgmma():
    """With --rows, kernel_ptx.py compiles the quantized tensor-core kernel: a 16-row tile multiplies with
    mma.sync, and swapped ((W x^T)^T, the converted weights as the 64-row left operand) with Hopper's wgmma."""
    pytest.importorskip("triton")
    mma = {}
    for swap in ([], ["--swap"]):
        out = subprocess.run([sys.executable, "benchmarks/kernel_ptx.py", "--format", "int4", "--rows", "16",
                              "--block_n", "64", "--block_k", "128", "--warps", "4", *swap], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["rows"] == 16 and result["swap"] == bool(swap) and result["weights"] == 64 * 128 / 128
        mma[bool(swap)] = {op.split(".")[0] for op in result["counts"] if "mma" in op}
    assert mma == {False: {"mma"}, True: {"wgmma"}}, mma
