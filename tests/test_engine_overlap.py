"""The serving engine launching each step before the host has read the tokens of the step before (what it does on
GPUs: the next step takes them on the device) answers exactly as the engine that reads them first."""
import pytest

from llama_dist import Llama
from llama_dist.generation.sampling import SamplingParams
from llama_dist.serving.engine import Engine

from .helpers import engine_answers

PROMPTS = [[5 + i, 9, 13 + i][: 1 + i % 3] + [7] * (i % 5) * 2 for i in range(10)]
LENGTHS = [4 + (i * 5) % 11 for i in range(10)]


def _answers(llama: Llama, options: list[dict] | None = None, lengths: list[int] = LENGTHS, **engine_options
             ) -> tuple[list[list[int]], int, float]:
    """The engine's answers, how many of its steps fed a token the host had not read yet, and how many times it
    preempted a request."""
    engine = Engine(llama, prefill_chunk=4, **engine_options)
    execute, ahead = engine._execute, [0]

    def counted(plan):
        ahead[0] += any(token < 0 for _, token, _ in plan.decode)
        return execute(plan)

    engine._execute = counted
    answers, events = engine_answers(engine, PROMPTS, lengths, options=options)
    preempted = engine.metrics.registry.get_sample_value("llamadist_requests_preempted_total")
    return [a + [e["stop_type"]] for a, e in zip(answers, events)], ahead[0], preempted


@pytest.mark.parametrize("fold_decode", [False, True])
def test_steps_launched_ahead_answer_as_steps_that_wait(tiny_checkpoints, sp_tokenizer, fold_decode):
    """More requests than slots, prompts read in chunks of 4 while others decode (decode rows in separate steps,
    or folded into the prompt pass as GPUs run them), some stopping at an end token, some with ignore_eos."""
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=4, dtype="float32")
    options = [{"ignore_eos": i % 3 == 0} for i in range(len(PROMPTS))]
    expected, ahead, _ = _answers(llama, options, fold_decode=fold_decode, overlap=False)
    assert ahead == 0 and sum(map(len, expected)) >= 60
    got, ahead, preempted = _answers(llama, options, fold_decode=fold_decode, overlap=True)
    assert got == expected and ahead > 20


def test_sampled_requests_run_ahead_with_their_own_draws(tiny_checkpoints, sp_tokenizer):
    """Sampled requests (each its own seed, some with a logit bias) are drawn on the device and run ahead as greedy
    ones do; each draws what it draws when the engine waits (the same generator, the same draws)."""
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=4, dtype="float32")
    options = [{"params": SamplingParams(temperature=0.9, top_k=20, top_p=0.9 if i % 2 else 1.0,
                                         logit_bias={7: 2.0} if i % 3 == 0 else {}), "seed": i}
               for i in range(len(PROMPTS))]
    expected, _, _ = _answers(llama, options, overlap=False)
    got, ahead, _ = _answers(llama, options, overlap=True)
    assert got == expected and ahead > 20


def test_requests_that_need_their_logits_on_the_host_wait_for_them(tiny_checkpoints, sp_tokenizer):
    """Log-probability and repeat-penalty requests beside greedy ones: steps holding them are read before the next
    is planned, the others run ahead, and every answer is the one the waiting engine gives."""
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=4, dtype="float32")
    options = [{"params": SamplingParams(temperature=0.9, repeat_penalty=1.3), "seed": i} if i % 4 == 1 else
               {"top_logprobs": 2} if i % 4 == 2 else {} for i in range(len(PROMPTS))]
    expected, _, _ = _answers(llama, options, overlap=False)
    got, ahead, _ = _answers(llama, options, overlap=True)
    assert got == expected and ahead > 0


def test_preemption_with_tokens_in_flight(tiny_checkpoints, sp_tokenizer):
    """A cache of one context for four sequences: requests are preempted while the engine runs ahead (tokens in
    flight are read first: they may end requests and free blocks), and every answer is the one it gets with
    room."""
    roomy = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=4, dtype="float32")
    tight = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=4, dtype="float32",
                        kv_tokens=64)
    options, lengths = [{"ignore_eos": True}] * len(PROMPTS), [20 + (i * 7) % 13 for i in range(len(PROMPTS))]
    expected, _, _ = _answers(roomy, options, lengths, overlap=False)
    got, ahead, preempted = _answers(tight, options, lengths, overlap=True)
    assert got == expected and ahead > 20 and preempted > 0


def test_a_repeat_penalty_is_applied_to_each_token(tiny_checkpoints, sp_tokenizer):
    """A greedy request with a huge repeat penalty never picks a token of its recent history (the penalty reads the
    history on the host, so its steps are not run ahead), while without it this random model's greedy answers
    repeat themselves."""
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=4, dtype="float32")
    engine = Engine(llama, prefill_chunk=4, overlap=True)
    prompts, lengths = PROMPTS[:4], [24] * 4
    plain, _ = engine_answers(engine, prompts, lengths, options=[{"ignore_eos": True}] * 4)
    assert any(len(set(a)) < len(a) for a in plain)
    penalised, _ = engine_answers(engine, prompts, lengths, options=[
        {"ignore_eos": True, "params": SamplingParams(temperature=0.0, repeat_penalty=1e4)}] * 4)
    for prompt, answer in zip(prompts, penalised):
        assert len(answer) == 24 and not set(answer) & set(prompt) and len(set(answer)) == len(answer)
