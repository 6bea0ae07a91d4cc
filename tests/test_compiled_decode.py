"""The compiled decode step (the GPU fast path, here on CPU inductor) generates what eager generation does."""
import torch

from llama_dist import Llama
from llama_dist.runner import step as runner_step
from llama_dist.runner.step import attention_window, batch_bucket
from llama_dist.model.args import ModelArgs
from llama_dist.serving.engine import Engine

from .helpers import TINY_GQA, engine_answers, random_state_dict, write_meta_checkpoint
from .workers.tp_worker import PROMPTS


def test_attention_window_is_a_power_of_two_holding_the_position():
    assert [attention_window(p, 4096) for p in (0, 255, 256, 511, 512, 4095)] == [256, 256, 512, 512, 1024, 4096]
    assert attention_window(300, 384) == 384  # never past the cache


def test_compiled_decode_equals_eager(tiny_checkpoints, sp_tokenizer, monkeypatch):
    # small windows so that generation crosses window sizes 8 -> 16 -> 32 (a graph each)
    monkeypatch.setattr(runner_step, "MIN_ATTENTION_WINDOW", 8)
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
    first.runner.decode(tokens, 3)
    got = second.runner.decode(tokens, 3)
    assert got.shape[-1] == other_args.vocab_size
    assert (got - second_eager.model(tokens, 3)).abs().max() < 1e-5


def _engine_answers(llama: Llama, prompts: list[list[int]], lengths: list[int], **options) -> list[list[int]]:
    """Greedy answers of a new serving engine to prompts submitted together, checking that its steps folded decode
    rows into prompt passes exactly when told to."""
    engine = Engine(llama, max_batch=llama.model.max_batch_size, **options)
    folds = engine._folds
    engine.folded_steps = 0

    def count(*args) -> bool:
        folded = folds(*args)
        engine.folded_steps += folded
        return folded

    engine._folds = count
    answers, _ = engine_answers(engine, prompts, lengths)
    assert engine.folded_steps if options.get("fold_decode") else not engine.folded_steps
    return answers


def test_compiled_server_steps_equal_eager(tiny_checkpoints, sp_tokenizer, monkeypatch):
    """The engine's compiled decode steps (batches padded to 1, 2, 4 or 8 rows by repeating the last row,
    cache windows 8 -> 16 -> 32) answer as its eager steps do, for requests that join and leave."""
    monkeypatch.setattr(runner_step, "MIN_ATTENTION_WINDOW", 8)
    prompts = [[5, 9, 13], [7], [3, 3, 8, 21, 4], [11, 2], [6, 30, 12]]
    lengths = [12, 5, 20, 3, 9]  # rows leave at different steps: batches of 5, 4, 3 ... rows
    eager = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=8)
    compiled = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=8, compile=True)
    expected = _engine_answers(eager, prompts, lengths)
    assert sum(len(a) for a in expected) >= 30  # (a random model stops some rows early, at its end token)
    assert _engine_answers(compiled, prompts, lengths) == expected


def test_decode_rows_folded_into_prompt_passes_answer_as_decode_steps(tiny_checkpoints, sp_tokenizer):
    """Decode rows that join a step's prompt pass as runs of one token (what GPUs do where that pass is a CUDA
    graph) choose the tokens separate decode steps choose: more requests than slots, and prompts read in
    chunks of 4, so most steps read a prompt while other rows decode."""
    prompts = [[5 + i, 9, 13 + i][: 1 + i % 3] + [7] * (i % 5) * 2 for i in range(10)]
    lengths = [4 + (i * 5) % 11 for i in range(10)]
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=4)
    expected = _engine_answers(llama, prompts, lengths, prefill_chunk=4, fold_decode=False)
    assert sum(len(a) for a in expected) >= 40
    assert _engine_answers(llama, prompts, lengths, prefill_chunk=4, fold_decode=True) == expected


def test_batch_buckets_are_powers_of_two_within_the_cache():
    assert [batch_bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert batch_bucket(5, 6) == 6
