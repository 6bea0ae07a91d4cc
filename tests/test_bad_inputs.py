"""Bad inputs fail with a clear message before any weight is loaded."""
import shutil

import pytest

import llama_dist.generation.llama as generation
from llama_dist import Llama
from llama_dist.model.args import ModelArgs

from .helpers import WORKERS, launch_ranks


@pytest.fixture(autouse=True)
def no_weight_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")
    monkeypatch.setattr(generation, "load_model", refuse)


def build(ckpt, tokenizer):
    return Llama.build(ckpt, tokenizer, max_seq_len=32, max_batch_size=1)


def test_missing_ckpt_dir(tmp_path, sp_tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        build(tmp_path / "nope", sp_tokenizer)


def test_no_params_json(tmp_path, tiny_checkpoints, sp_tokenizer):
    ckpt = shutil.copytree(tiny_checkpoints["mp1"], tmp_path / "c")
    (ckpt / "params.json").unlink()
    with pytest.raises(ValueError, match="no params.json"):
        build(ckpt, sp_tokenizer)


def test_no_pth_files(tmp_path, tiny_checkpoints, sp_tokenizer):
    ckpt = shutil.copytree(tiny_checkpoints["mp1"], tmp_path / "c")
    for p in ckpt.glob("*.pth"):
        p.unlink()
    with pytest.raises(ValueError, match=r"no consolidated\.\*\.pth"):
        build(ckpt, sp_tokenizer)


def test_truncated_pth(tmp_path, tiny_checkpoints, sp_tokenizer):
    ckpt = shutil.copytree(tiny_checkpoints["mp2"], tmp_path / "c")
    shard = ckpt / "consolidated.01.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth .*truncated"):
        build(ckpt, sp_tokenizer)


def test_missing_tokenizer(tmp_path, tiny_checkpoints):
    with pytest.raises(ValueError, match="Tokenizer file .* does not exist"):
        build(tiny_checkpoints["mp1"], tmp_path / "tokenizer.model")


def test_world_size_message_names_both_numbers_and_working_sizes():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=384, multiple_of=32)
    with pytest.raises(ValueError) as e:
        args.check_world_size(3)
    msg = str(e.value)
    assert "n_heads=4 is not divisible by 3" in msg and "sizes that work: 1, 2, 4" in msg


def test_three_ranks_refused_before_loading(tiny_checkpoints, sp_tokenizer, tmp_path):
    """A real 3-rank launch on a 4-head model: every rank exits non-zero with the explanation."""
    results = launch_ranks(3, [str(WORKERS / "tp_worker.py"), str(tmp_path / "r"), str(sp_tokenizer),
                               str(tiny_checkpoints["mp1"]), "--gloo"], timeout=120)
    for r in results:
        assert r.returncode != 0
        assert "cannot be split across 3 ranks" in r.stderr and "n_heads=4" in r.stderr, r.stderr
    assert not list(tmp_path.glob("r.rank*"))


def test_overlap_on_a_pipeline_is_refused_before_loading():
    """The engine's overlap feeds each step the tokens the device chose; a pipeline's first stage has no logits."""
    from llama_dist.checkpoint.config import LoadConfig
    from llama_dist.distributed.layout import ParallelConfig
    from llama_dist.serving.server import serve

    with pytest.raises(ValueError, match="--overlap needs one pipeline stage"):
        serve(LoadConfig(), ParallelConfig(pp=2), port=0, overlap=True)
