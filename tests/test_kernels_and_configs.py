"""The kernel choice (made once, from the device and our switches), the CPU backend against the plain model, and
the configs that carry a run's options."""
import json
import os

import pytest
import torch

from llama_dist import Kernels, Llama, LoadConfig, ParallelConfig, csrc
from llama_dist.checkpoint.bundled import bundled_model_path
from llama_dist.checkpoint.loader import load_model, open_checkpoint
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.distributed.context import init_distributed
from llama_dist.distributed.settings import read_settings
from llama_dist.kernels import choose_kernels, install
from llama_dist.kernels.fused import CpuDecodeAttention
from llama_dist.model.args import ModelArgs
from llama_dist.model.transformer import Attention
from llama_dist.serving.engine import Engine

from .helpers import TINY_GQA, random_state_dict


def test_switches_are_read_from_the_environment_given():
    assert read_settings({}) == read_settings({"LLAMA_DIST_GEMV": "1"})
    s = read_settings({"LLAMA_DIST_GEMV": "0", "LLAMA_DIST_ATTENTION": "0", "LLAMA_DIST_SYMM_MEM": "0",
                       "LLAMA_DIST_PDL": "0", "LLAMA_DIST_CPU_KERNELS": "scalar", "LLAMA_DIST_TIMEOUT": "7"})
    assert (s.gemv, s.attention, s.symm_mem, s.pdl, s.cpu_kernels, s.timeout_s) == (False, False, False, False,
                                                                                    "scalar", 7.0)
    assert read_settings({"LLAMA_DIST_CPU_KERNELS": "0"}).cpu_kernels == "off"


def test_cpus_get_the_cpu_attention_and_nothing_from_cuda():
    built = csrc.available()
    assert choose_kernels(torch.device("cpu"), read_settings({})) == Kernels("cpp" if built else "cpu", gemv=built)
    assert choose_kernels(torch.device("cpu"), read_settings({"LLAMA_DIST_GEMV": "0", "LLAMA_DIST_ATTENTION": "0"})) == Kernels("cpu")
    with pytest.raises(ValueError, match="choose one of sdpa, cpu, cpp, triton"):
        Kernels("flash")


def test_batch_invariance_takes_kernels_that_are_and_refuses_what_is_not(tiny_checkpoints, sp_tokenizer):
    """CUDA's batch-invariant set has the per-row kernels and none of those that sum by batch size; on CPUs the
    block kernels of quantized weights are invariant already, dense weights (BLAS) are refused, not run."""
    Kernels("triton", row_kernels=True, batch_invariant=True)
    for bad in ({"attention": "sdpa"}, {"gemv": True}, {"quantized": True}, {"symm_mem": True}):
        with pytest.raises(ValueError, match="batch-invariant kernels"):
            Kernels(**{"attention": "triton", "row_kernels": True, "batch_invariant": True, **bad})
    with pytest.raises(ValueError, match="dense weights multiply through BLAS"):
        Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=32, quantize="none", batch_invariant=True)
    llama = Llama.build(str(bundled_model_path()), max_seq_len=32, max_batch_size=2, batch_invariant=True)
    assert choose_kernels(torch.device("cpu"), batch_invariant=True) == choose_kernels(torch.device("cpu"))
    assert not llama.runner.batch_invariant  # (no kernels changed)
    llama.runner.batch_invariant = True  # as where the CUDA kernels are installed: no decode rows in prompt passes
    assert Engine(llama, fold_decode=True).fold_decode is False


@pytest.mark.parametrize("kernels", [Kernels("cpu"), Kernels("cpp", gemv=True)])
def test_cpu_kernels_compute_what_the_plain_model_computes(kernels):
    """Installed once: every block's attention takes the fp32 decode path (with "cpp", decode steps attend in one
    C++ call per layer); prompts and decode steps (one and three rows, rows at different positions) give the plain
    model's logits."""
    if kernels.attention == "cpp" and not csrc.available():
        pytest.skip("no C++ compiler to build the CPU kernels")
    args = ModelArgs(**TINY_GQA)
    ctx, state = init_distributed(), random_state_dict(args)
    config = LoadConfig(dtype="float32", n_ctx=16, max_batch_size=3)
    plain = load_model(StateDictSource(args, state), ctx, config, progress=False)
    fast = install(load_model(StateDictSource(args, state), ctx, config, progress=False), kernels)
    assert all(type(b.attention) is CpuDecodeAttention for b in fast.layers.values())
    assert all(type(b.attention) is Attention for b in plain.layers.values())
    assert all(getattr(b, "attention_kernel", False) == (kernels.attention == "cpp") for b in fast.layers.values())
    tokens = torch.tensor([[5, 17, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6], [300, 8, 8, 8, 41, 0]])
    assert (fast(tokens, 0) - plain(tokens, 0)).abs().max() < 1e-5
    for rows in (tokens[:1], tokens):
        got = torch.cat([fast(rows[:, i:i + 1], i) for i in range(6)], dim=1)
        want = torch.cat([plain(rows[:, i:i + 1], i) for i in range(6)], dim=1)
        assert (got - want).abs().max() < 1e-5
    starts = torch.tensor([2, 5, 0])  # rows at different positions (the server's batches)
    assert (fast(tokens[:, :1], starts) - plain(tokens[:, :1], starts)).abs().max() < 1e-5
    for a, b in zip(fast.layers.values(), plain.layers.values()):  # the kernel wrote the caches the model reads
        assert (a.attention.cache_k - b.attention.cache_k).abs().max() < 1e-5
        assert (a.attention.cache_v - b.attention.cache_v).abs().max() < 1e-5


@pytest.mark.skipif(not csrc.available(), reason="no C++ compiler to build the CPU kernels")
def test_folded_block_kernels_decode_what_the_plain_quantized_model_decodes():
    """int4 weights in the C++ block format: a decode step's norms, SwiGLU and residuals folded into the matmuls
    give the plain modules' logits (both quantize activations to 8 bits; the folded norm may round a value to
    the neighbouring 8-bit step, so not bit for bit), and a row's logits do not depend on its batch."""
    args = ModelArgs(**TINY_GQA)
    ctx, state = init_distributed(), random_state_dict(args)
    config = LoadConfig(dtype="float32", quantize="int4", group_size=32, n_ctx=16, max_batch_size=3)
    plain = load_model(StateDictSource(args, state), ctx, config, progress=False)
    fast = install(load_model(StateDictSource(args, state), ctx, config, progress=False), Kernels("cpp", gemv=True))
    assert all(type(b).__name__ == "FusedTransformerBlock" and b.use_gemv for b in fast.layers.values())
    tokens = torch.tensor([[5, 17, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6], [300, 8, 8, 8, 41, 0]])
    got = torch.cat([fast(tokens[:, i:i + 1], i) for i in range(6)], dim=1)
    want = torch.cat([plain(tokens[:, i:i + 1], i) for i in range(6)], dim=1)
    assert (got - want).abs().max() / want.abs().max() < 1e-3
    alone = torch.cat([fast(tokens[1:2, i:i + 1], i, slots=torch.tensor([1])) for i in range(6)], dim=1)
    assert torch.equal(alone[0], got[1])


@pytest.mark.skipif(not csrc.available(), reason="no C++ compiler to build the CPU kernels")
@pytest.mark.parametrize("model", ["tiny-int4", "smollm2"])  # int4 groups as Q4_1 blocks; the GGUF's Q4_1 + Q8_0
def test_one_call_decode_step_equals_the_per_layer_calls(model):
    """In one process every block of a decode step runs in one C++ call: bit for bit the per-layer calls' logits
    and caches, one row and rows at different positions and cache rows; prompts still go layer by layer."""
    from llama_dist.kernels.fused import CppDecodeTransformer

    ctx = init_distributed()
    if model == "smollm2":
        source = open_checkpoint(bundled_model_path())
        config = LoadConfig(dtype="float32", n_ctx=16, max_batch_size=3)
    else:
        args = ModelArgs(**TINY_GQA)
        source = StateDictSource(args, random_state_dict(args))
        config = LoadConfig(dtype="float32", quantize="int4", group_size=32, n_ctx=16, max_batch_size=3)
    one, per_layer = (install(load_model(source, ctx, config, progress=False), Kernels("cpp", gemv=True))
                      for _ in range(2))
    assert type(one) is CppDecodeTransformer
    per_layer.__class__ = CppDecodeTransformer.__mro__[1]  # the plain Transformer: its blocks one by one
    tokens = torch.tensor([[5, 17, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6], [300, 8, 8, 8, 41, 0]])
    for m in (one, per_layer):
        m(tokens[:, :4], 0)
    for step in range(2):
        got, want = (m(tokens[:, 4 + step:5 + step], 4 + step) for m in (one, per_layer))
        assert torch.equal(got, want)
    starts, rows = torch.tensor([7, 2]), torch.tensor([2, 0])
    assert torch.equal(one(tokens[:2, :1], starts, slots=rows), per_layer(tokens[:2, :1], starts, slots=rows))
    for a, b in zip(one.layers.values(), per_layer.layers.values()):
        assert torch.equal(a.attention.cache_k, b.attention.cache_k) and torch.equal(a.attention.cache_v, b.attention.cache_v)


def _test_tuner(tuning, triton, **options):
    @triton.jit
    def kernel(x_ptr, n, BLOCK: triton.language.constexpr):
        pass

    return tuning.autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32}, num_warps=8)], ["n"],
                           "test_tiles", **options)(kernel)


def test_tiles_picked_is_a_tile_table_of_each_tuned_kernels_choice_per_key():
    triton = pytest.importorskip("triton")
    from llama_dist.kernels import tuning
    tuner = _test_tuner(tuning, triton)
    try:
        assert "test_tiles" not in tuning.tiles_picked()  # not run yet: nothing picked
        tuner.cache[(4096, "torch.bfloat16")] = tuner.configs[1]  # what a run's timing leaves there
        assert tuning.tiles_picked()["test_tiles"] == {"n=4096": {"BLOCK": 32, "num_warps": 8, "num_stages": 3}}
    finally:
        tuning._TUNED.pop("test_tiles")


def test_compiled_variants_name_each_loaded_kernels_tile_and_registers(monkeypatch):
    """What benchmarks print of the kernels a GPU run loaded: each variant's constexprs and warps by name, its
    register cap, the integer arguments taken as multiples of 16, and the registers and spills the driver reported
    (set here as loading sets them, on a kernel compiled for sm_90 without a GPU); variants never loaded are left
    out."""
    triton = pytest.importorskip("triton")
    from llama_dist.kernels import tuning
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from kernel_ptx import compile_for

    monkeypatch.setitem(globals(), "triton", triton)  # (the test kernel's annotation names it; compiling reads it)
    tuner = _test_tuner(tuning, triton)
    try:
        loaded, unloaded = (compile_for(tuner.fn, {"BLOCK": 32}, {"x_ptr": "*fp32"}, aligned=("x_ptr", "n"),
                                        num_warps=8, maxnreg=64) for _ in range(2))
        loaded.n_regs, loaded.n_spills = 40, 0  # (what the driver's load_binary sets)
        tuner.fn.device_caches["test device"] = ({"a": loaded, "b": unloaded}, None, None, None, None)
        assert tuning.compiled_variants() == [{"kernel": "kernel", "BLOCK": 32, "num_warps": 8, "maxnreg": 64,
                                               "multiples_of_16": ["n"], "registers": 40, "spilled": 0}]
    finally:
        tuning._TUNED.pop("test_tiles")


def test_the_tuner_times_only_the_tile_tables_choice_where_it_has_one(tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")
    from llama_dist.kernels import tuning
    table = tmp_path / "tiles.json"
    table.write_text(json.dumps({"test_tiles": {"n=4096": {"BLOCK": 32, "num_warps": 8, "num_stages": 3},
                                                "n=64": {"BLOCK": 32, "num_warps": 2, "num_stages": 3}}}))
    monkeypatch.setenv("LLAMA_DIST_TILES", str(table))
    tuner = _test_tuner(tuning, triton)
    try:
        def pruned(n):
            tuner.nargs = {"x_ptr": torch.zeros(1), "n": n}  # (as Autotuner.run sets them before pruning)
            return tuner.prune_configs({})
        assert pruned(4096) == [tuner.configs[1]]
        assert pruned(1024) == tuner.configs  # not in the table: every config timed
        assert pruned(64) == tuner.configs  # the table's tile is not among the configs: every config timed
        monkeypatch.setenv("LLAMA_DIST_TILES", str(tmp_path / "missing.json"))
        tuner = _test_tuner(tuning, triton)  # (the switch is read once, as a tuner is made)
        with pytest.raises(FileNotFoundError, match="LLAMA_DIST_TILES="):
            pruned(4096)
        (tmp_path / "broken.json").write_text("{'n=4096': 16")
        monkeypatch.setenv("LLAMA_DIST_TILES", str(tmp_path / "broken.json"))
        tuner = _test_tuner(tuning, triton)
        with pytest.raises(ValueError, match="broken.json: not a tile table"):
            pruned(4096)
        # a kernel's own pruning (tiles that do not fit) comes first, the table's tile only among what is left
        monkeypatch.setenv("LLAMA_DIST_TILES", str(table))
        tuner = _test_tuner(tuning, triton, prune_configs_by={
            "early_config_prune": lambda configs, named_args, **kwargs: [c for c in configs if c.num_warps == 4],
            "top_k": 2})
        assert pruned(4096) == pruned(1024) == [tuner.configs[0]]
        assert tuner.configs_top_k == 2  # (the pruning's other entries reach the tuner as given)
    finally:
        tuning._TUNED.pop("test_tiles")


def test_shipped_tile_tables_name_configs_the_tuners_have():
    """A table's tile outside its kernel's list of configs would count for nothing: each must be in the list."""
    pytest.importorskip("triton")
    from llama_dist.kernels import gemv_triton, tuning
    lists = {"gemv": gemv_triton._CONFIGS, "gemv_int4": gemv_triton._INT4_CONFIGS,
             "gemv_int8": gemv_triton._DP4A_CONFIGS}
    tables = sorted(tuning._TABLES.glob("*.json"))
    assert tuning.table_path("NVIDIA H200") in tables
    for path in tables:
        for name, rows in tuning.tile_table(str(path)).items():
            assert rows, path
            for key, tile in rows.items():
                assert key.startswith("N=") and tile in [tuning.tile_fields(c) for c in lists[name]], (path, key)


def test_disk_timings_reads_the_tuners_latest_full_timing_of_a_key(tmp_path):
    triton = pytest.importorskip("triton")
    from llama_dist.kernels import tuning
    tuner = _test_tuner(tuning, triton)

    def keep(folder, key, timings, age):
        file = tmp_path / folder / "kernel.autotune.json"
        file.parent.mkdir()
        kept = [(c.__dict__ | {"pre_hook": None}, t) for c, t in zip(tuner.configs, timings)]  # as Triton writes it
        file.write_text(json.dumps({"key": key, "configs_timings": kept}))
        os.utime(file, (age, age))
    try:
        keep("a", [4096, "torch.bfloat16"], [[2.0, 1.9, 2.1], [1.0, 0.9, 1.1]], 100)
        keep("b", [4096, "torch.bfloat16"], [[1.0, 0.9, 1.1], [3.0, 2.9, 3.1]], 200)  # the latest
        keep("c", [4096, "torch.bfloat16"], [[0.5, 0.4, 0.6]], 300)  # one config: a table's, not a full timing
        keep("d", [2048, "torch.bfloat16"], [[0.1, 0.1, 0.1], [0.2, 0.2, 0.2]], 400)  # another key
        assert tuning.disk_timings("test_tiles", "n=4096", str(tmp_path)) == [
            ({"BLOCK": 16, "num_warps": 4, "num_stages": 3}, 1.0),
            ({"BLOCK": 32, "num_warps": 8, "num_stages": 3}, 3.0)]
        assert tuning.disk_timings("test_tiles", "n=8", str(tmp_path)) == []
    finally:
        tuning._TUNED.pop("test_tiles")


def test_configs_refuse_bad_values_by_their_names():
    with pytest.raises(ValueError, match="quantize='int3': choose one of auto, none, int8, int4"):
        LoadConfig(quantize="int3")
    with pytest.raises(ValueError, match="n_ctx=0: it must be at least 1"):
        LoadConfig(n_ctx=0)
    with pytest.raises(ValueError, match="dtype='float33' is not a torch dtype"):
        LoadConfig(dtype="float33")
    assert LoadConfig(dtype="bfloat16").torch_dtype == torch.bfloat16
    assert ParallelConfig(pp=2, pp_split="3,1").pp_split == (3, 1)


def test_build_takes_meta_arguments_and_config_fields_only(tiny_checkpoints, sp_tokenizer):
    with pytest.raises(TypeError, match="Unknown option\\(s\\) quantise; the options are .*quantize"):
        Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, quantise="int8")
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=32, max_batch_size=2, quantize="int8",
                        dtype="bfloat16")
    assert (llama.model.n_ctx, llama.model.max_batch_size, llama.model.act_dtype) == (32, 2, torch.bfloat16)
    assert type(llama.model.layers["0"].attention) is CpuDecodeAttention  # the device's kernels, installed once


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_packed_sequences_compute_what_passes_of_their_own_compute(quantize):
    """A server step reads several prompt chunks side by side in one pass (runner.prefill): each chunk's logits
    and cached keys and values are those of a pass of its own, chunks of one token too, and a chunk the next one
    continues (a long prompt's) gives no logits of its own. Bit for bit through our block kernels (int8 here,
    the GGUF types in CI's server test), whose sums for a row do not depend on the other rows; dense weights go
    through BLAS, whose sums do (by ~1e-6 of fp32)."""
    from llama_dist.model.transformer import Packed

    args = ModelArgs(**TINY_GQA)
    ctx, state = init_distributed(), random_state_dict(args)
    config = LoadConfig(dtype="float32", quantize=quantize, n_ctx=32, max_batch_size=4)
    alone, packed = (install(load_model(StateDictSource(args, state), ctx, config, progress=False), Kernels("cpu"))
                     for _ in range(2))
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, args.vocab_size, (1, 6), generator=g)
    for model in (alone, packed):  # row 3 holds a context the second chunk continues
        model(prefix, 0, slots=torch.tensor([3]))
    chunks = [(1, 0, [5, 9, 2, 8, 1]), (3, 6, [7, 7, 4]), (3, 9, [6, 2]), (0, 0, [11])]  # (slot, start, ids)
    want = torch.cat([alone(torch.tensor([ids]), start, torch.tensor([slot]), last_only=True)[0]
                      for slot, start, ids in chunks])
    slots, starts, ids = zip(*chunks)
    got = packed(torch.tensor([[t for part in ids for t in part]]), 0, Packed.of(slots, starts, (5, 3, 2, 1), "cpu"),
                 last_only=True)[0]
    same = torch.equal if quantize == "int8" else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert got.shape == (3, args.vocab_size) and same(got, want[[0, 2, 3]])  # (3, 6, ...) runs on into (3, 9, ...)
    for a, b in zip(alone.layers.values(), packed.layers.values()):
        assert same(a.attention.cache_k, b.attention.cache_k) and same(a.attention.cache_v, b.attention.cache_v)
    with pytest.raises(ValueError, match="do not match"):  # fewer tokens than the sequences hold
        packed(torch.tensor([[1, 2]]), 0, Packed.of((0,), (0,), (3,), "cpu"))
    with pytest.raises(ValueError, match="do not match"):  # a row the cache does not have
        packed(torch.tensor([[1, 2]]), 0, Packed.of((4,), (0,), (2,), "cpu"))
