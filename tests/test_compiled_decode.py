"""The compiled decode step (the GPU fast path, here on CPU inductor) generates what eager generation does."""
import torch

from llama_dist import Llama

from .workers.tp_worker import PROMPTS


def test_compiled_decode_equals_eager(tiny_checkpoints, sp_tokenizer):
    eager = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=2)
    compiled = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=2, compile=True)
    expected, _ = eager.generate(PROMPTS, max_gen_len=16, temperature=0.0)
    got, _ = compiled.generate(PROMPTS, max_gen_len=16, temperature=0.0)
    assert got == expected
    # the static-shape step (whole cache + mask, position as a tensor) gives the same logits as eager
    tokens = torch.tensor([[5], [9]])
    a = eager.model(tokens, 20)
    b = compiled.model(tokens, torch.tensor([20, 20]), length=64)
    assert (a - b).abs().max() < 1e-5
