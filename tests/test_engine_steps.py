"""What the serving engine puts in a step: while answers stream, its prompt tokens and decode rows together stay
within prefill_chunk (the rows join the prompt pass, replayed on GPUs from the graph of the next token bucket up),
and answers are those of requests run alone."""
from llama_dist import Llama
from llama_dist.serving.engine import Engine

from .helpers import engine_answers


def test_a_streaming_step_holds_at_most_a_chunk_of_tokens(tiny_checkpoints, sp_tokenizer):
    """Short prompts (four fit a chunk of 16) arriving while four answers stream: a step packs prompts only as
    far as the rows leave room (three); a lone chunk still goes (prompts never wait for rows to end)."""
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=12, dtype="float32")
    prompts = [[5 + i, 9, 13 + i, 7] for i in range(28)]
    lengths = [40] * 4 + [3] * 24  # four long answers streaming while short ones come and go in eights
    engine = Engine(llama, prefill_chunk=16)
    execute, steps = engine._execute, []

    def recorded(plan):
        steps.append((len(plan.decode), [len(c.ids) for c in plan.prefill]))
        return execute(plan)

    engine._execute = recorded
    answers, _ = engine_answers(engine, prompts, lengths)
    mixed = [(rows, chunks) for rows, chunks in steps if rows and chunks]
    assert len(mixed) >= 4, steps
    assert all(rows + sum(chunks) <= 16 or len(chunks) == 1 for rows, chunks in mixed), mixed
    assert any(len(chunks) > 1 for _, chunks in mixed), mixed  # (prompts are still packed where rows leave room)
    alone = [engine_answers(Engine(llama, prefill_chunk=16), [p], [n])[0][0] for p, n in zip(prompts, lengths)]
    assert answers == alone
