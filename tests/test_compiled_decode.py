"""The compiled decode step (the GPU fast path, here on CPU inductor) generates what eager generation does."""
import torch

from llama_dist import Llama
from llama_dist.generation import llama as generation
from llama_dist.generation.llama import attention_window
from llama_dist.model.args import ModelArgs

from .helpers import TINY_GQA, random_state_dict, write_meta_checkpoint

from .workers.tp_worker import PROMPTS


def test_attention_window_is_a_power_of_two_holding_the_position():
    assert [attention_window(p, 4096) for p in (0, 255, 256, 511, 512, 4095)] == [256, 256, 512, 512, 1024, 4096]
    assert attention_window(300, 384) == 384  # never past the cache


def test_compiled_decode_equals_eager(tiny_checkpoints, sp_tokenizer, monkeypatch):
    # small windows so that generation crosses window sizes 8 -> 16 -> 32 (a graph each)
    monkeypatch.setattr(generation, "MIN_ATTENTION_WINDOW", 8)
    eager = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=2)
    compiled = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=2, compile=True)
    expected, _ = eager.generate(PROMPTS, max_gen_len=16, temperature=0.0)
    got, _ = compiled.generate(PROMPTS, max_gen_len=16, temperature=0.0)
    assert got == expected
    # the static-shape step (a cache window + mask, position as a tensor) gives the same logits as eager
    tokens = torch.tensor([[5], [9]])
    a = eager.model(tokens, 20)
    for window in (32, 64):
        b = compiled.model(tokens, torch.tensor([20, 20]), length=window)
        assert (a - b).abs().max() < 1e-5


def test_two_compiled_models_in_one_process_keep_their_own_graphs(tiny_checkpoints, sp_tokenizer, tmp_path):
    # module guards are skipped for speed, so a second model of another shape must not reuse the first's graph
    other_args = ModelArgs(**{**TINY_GQA, "dim": 48, "n_heads": 4, "n_kv_heads": 4})
    other = write_meta_checkpoint(tmp_path / "other", other_args, random_state_dict(other_args, seed=3), mp=1)
    first = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=2, compile=True)
    second = Llama.build(other, sp_tokenizer, max_seq_len=64, max_batch_size=2, compile=True)
    second_eager = Llama.build(other, sp_tokenizer, max_seq_len=64, max_batch_size=2)
    tokens = torch.tensor([[5], [9]])  # the same input tensor for both: only the models differ
    first.decode(tokens, 3)
    got = second.decode(tokens, 3)
    assert got.shape[-1] == other_args.vocab_size
    assert (got - second_eager.model(tokens, 3)).abs().max() < 1e-5
