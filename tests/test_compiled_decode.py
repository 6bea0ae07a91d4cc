"""The compiled decode step (the GPU fast path, here on CPU inductor) generates what eager generation does."""
import torch

from llama_dist import Llama
from llama_dist.generation import llama as generation
from llama_dist.generation.llama import attention_window

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
