"""Pipeline parallelism (TP x PP ranks over Gloo) gives what one process gives, each stage holding its layers."""
import pytest
import torch

from llama_dist.distributed.context import init_distributed
from llama_dist.model.args import ModelArgs
from llama_dist.distributed.layout import check_layout, parse_split, split_layers

from .helpers import WORKERS, check_all_ok, launch_ranks, random_state_dict, write_meta_checkpoint

# 4 layers (PP up to 4), 12 heads over 6 kv heads and an FFN of 288 (TP 1, 2 and 3)
TINY_PP = dict(dim=96, n_layers=4, n_heads=12, n_kv_heads=6, vocab_size=384, multiple_of=48, rope_theta=500000.0)


def test_layer_split_is_even_or_as_given():
    assert split_layers(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert split_layers(4, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    assert parse_split("10,20") == (10, 20) and parse_split((3, 1)) == (3, 1) and parse_split(None) is None


@pytest.mark.parametrize("pp, split, message", [
    (5, None, "more pipeline stages than the model's 4 layers"),
    (2, [4, 0], "leaves a stage without layers"),
    (2, [1, 2], "covers 3 layers; the model has 4"),
    (3, [2, 2], "names 2 stages, but pp is 3"),
])
def test_bad_splits_are_refused(pp, split, message):
    with pytest.raises(ValueError, match=message):
        split_layers(ModelArgs(**TINY_PP).n_layers, pp, split)


def test_world_must_be_tp_times_pp():
    assert check_layout(6, 3) == 2
    with pytest.raises(ValueError, match="4 rank\\(s\\) cannot form 3 pipeline stages"):
        check_layout(4, 3)
    with pytest.raises(ValueError, match="1 rank\\(s\\) cannot form 2 pipeline stages.*Launch a multiple of 2"):
        init_distributed(pp=2)  # a single process, refused before any rendezvous


@pytest.fixture(scope="module")
def tiny_pp(tmp_path_factory):
    args = ModelArgs(**TINY_PP)
    assert not args.tensor_parallel_problems(2) and not args.tensor_parallel_problems(3)
    return write_meta_checkpoint(tmp_path_factory.mktemp("tiny_pp"), args, random_state_dict(args, seed=3), mp=1)


@pytest.fixture(scope="module")
def single_process(tiny_pp, sp_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp1") / "res"
    check_all_ok(launch_ranks(1, [str(WORKERS / "tp_worker.py"), str(out), str(sp_tokenizer), str(tiny_pp)]))
    return torch.load(f"{out}.rank0")[str(tiny_pp)]


@pytest.mark.parametrize("tp, pp, split, min_part, compile", [
    (2, 2, None, 1, False), (1, 3, None, 1, False), (3, 1, None, 1, False), (1, 2, "1,3", 1, False),
    (1, 2, None, None, False), (1, 2, None, None, True)])
def test_pipeline_matches_single_process(tp, pp, split, min_part, compile, single_process, tiny_pp, sp_tokenizer,
                                         tmp_path):
    """min_part 1: micro-batches of rows (two prompts) and of sequence chunks (one prompt) even for these few
    tokens; None: the default, under which these small steps run whole. Generation decodes its two rows
    interleaved (each stage on one row while the other stage has the other), with eager or compiled stage
    steps; PP=3 has a stage without a row at each turn."""
    args = ModelArgs(**TINY_PP)
    out, ckpt = tmp_path / "res", str(tiny_pp)
    flags = ["--gloo", f"--pp={pp}"] + ([f"--pp-split={split}"] if split else [])
    flags += ([f"--min-part-tokens={min_part}"] if min_part else []) + (["--compile"] if compile else [])
    check_all_ok(launch_ranks(tp * pp, [str(WORKERS / "tp_worker.py"), str(out), str(sp_tokenizer), ckpt, *flags]))
    layers = split_layers(args.n_layers, pp, parse_split(split))
    for rank in range(tp * pp):
        got = torch.load(f"{out}.rank{rank}")[ckpt]
        rel = (got["logits"] - single_process["logits"]).abs().max() / single_process["logits"].abs().max()
        assert rel < 1e-5, (rank, rel)
        assert got["greedy"] == single_process["greedy"], rank
        # pipelines decode a row group (one row) per stage step; one stage decodes both rows in each step
        assert got["step_rows"] == ({1} if pp > 1 else {2}), rank
        stage = rank // tp
        held = sorted({int(n.split(".")[1]) for n in got["shapes"] if n.startswith("layers.")})
        assert held == list(layers[stage]), (rank, held)
        assert ("tok_embeddings.weight" in got["shapes"]) == (stage == 0)
        assert ("output.weight" in got["shapes"]) == (stage == pp - 1)
