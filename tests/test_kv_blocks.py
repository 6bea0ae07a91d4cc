"""The paged KV cache's record (serving/kv_blocks.py): which blocks a sequence holds, which prompt prefixes are
shared and kept, and the engine over a cache too small for every sequence at once (preemption)."""
import queue
import threading

import pytest

from llama_dist import Llama
from llama_dist.generation.sampling import SamplingParams
from llama_dist.serving.engine import Engine, Request
from llama_dist.serving.kv_blocks import KVBlocks

from .helpers import engine_answers


def read_prompt(kv: KVBlocks, row: int, prompt: list[int], start: int) -> None:
    """As the engine reads a prompt: chunks ending at multiples of the chunk size, then the prompt's end."""
    while start < len(prompt):
        end = kv.chunk_end(start, len(prompt))
        kv.wrote(row, start, prompt[start:end], prompt_chunk=True)
        start = end


def test_blocks_of_whole_aligned_chunks_are_shared_by_later_prompts():
    kv = KVBlocks(n_blocks=12, block=4, n_rows=3, chunk=4)
    prompt = list(range(1, 12))  # 11 tokens: chunks [0, 4), [4, 8) whole, [8, 11) cut short by the end
    assert kv.place(0, prompt) == 0 and len(kv.tables[0]) == 3
    read_prompt(kv, 0, prompt, 0)
    assert kv.place(1, prompt + [50, 51]) == 8  # the two whole chunks' blocks, shared
    assert kv.tables[1][:2] == kv.tables[0][:2] and kv.tables[1][2] not in kv.tables[0]
    assert [kv.refs[b] for b in kv.tables[0]] == [2, 2, 1]
    assert kv.place(2, prompt[:8]) == 4  # not all 8: the prompt's last token is read again (its logits)
    assert kv.in_use() == 3 + 2 + 1  # row 1: one new block for 8..12; row 2: one for 4..7
    tables = [[None] * 4 for _ in range(3)]  # what the model's block table is told
    for row, i, block in kv.take_changes():
        tables[row][i] = block
    assert [t[:len(kv.tables[row])] for row, t in enumerate(tables)] == kv.tables and kv.take_changes() == []


def test_tokens_from_decode_steps_or_a_cut_chunk_are_not_reused():
    kv = KVBlocks(n_blocks=10, block=2, n_rows=2, chunk=4)
    prompt = [1, 2, 3, 4, 5, 6]
    kv.place(0, prompt)
    read_prompt(kv, 0, prompt, 0)  # [0, 4) whole; [4, 6) cut short
    assert kv.grow(0, 8)
    kv.wrote(0, 6, [7])  # decode steps
    kv.wrote(0, 7, [8])
    assert kv.place(1, prompt + [7, 8, 9]) == 4
    kv.release(1)
    assert kv.place(1, prompt + [7, 8, 9], reuse=False) == 0


def test_reuse_is_in_whole_chunks_of_whole_blocks():
    kv = KVBlocks(n_blocks=16, block=4, n_rows=2, chunk=8)  # chunks of two blocks
    prompt = list(range(20))
    kv.place(0, prompt)
    read_prompt(kv, 0, prompt, 0)
    assert kv.place(1, prompt[:12] + [99] * 8) == 8  # 12 tokens match, the second chunk only in part
    kv = KVBlocks(n_blocks=16, block=4, n_rows=2, chunk=2)  # chunks of half a block
    kv.place(0, prompt)
    read_prompt(kv, 0, prompt, 0)
    assert kv.place(1, prompt[:7] + [99]) == 4  # 7 tokens match: one whole block


def test_by_block_any_prompt_pass_is_reused_block_by_block_but_never_decode_steps():
    kv = KVBlocks(n_blocks=16, block=4, n_rows=3, chunk=8, by_block=True)
    prompt = list(range(1, 15))  # 14 tokens: chunks [0, 8) and [8, 14), the second cut short by the end
    kv.place(0, prompt)
    read_prompt(kv, 0, prompt, 0)
    assert kv.grow(0, 16)
    kv.wrote(0, 14, [15])  # decode steps fill the fourth block
    kv.wrote(0, 15, [16])
    assert kv.place(1, prompt[:13] + [99]) == 12  # three blocks, the third from the cut chunk; not a chunk's 8
    assert kv.tables[1][:3] == kv.tables[0][:3]
    assert kv.place(2, prompt + [15, 16, 17]) == 12  # not the block the decode steps completed
    kv = KVBlocks(n_blocks=16, block=4, n_rows=2, chunk=8)  # the same without by_block: whole chunks only
    kv.place(0, prompt)
    read_prompt(kv, 0, prompt, 0)
    assert kv.place(1, prompt[:13] + [99]) == 8


def test_freed_prefixes_stay_until_their_blocks_are_needed_least_recently_freed_first():
    kv = KVBlocks(n_blocks=4, block=2, n_rows=2, chunk=2)
    a, b = [1, 2, 3], [7, 8, 9]
    for prompt in (a, b):
        kv.place(0, prompt)
        read_prompt(kv, 0, prompt, 0)
        kv.release(0)  # each leaves one registered block and one plain one
    assert kv.in_use() == 0
    assert kv.place(1, a) == 2  # a's prefix found after its sequence ended
    kv.release(1)
    assert kv.place(0, [5, 5, 5, 5, 5, 5]) == 0  # three blocks: the plain free ones, then b's (freed before a's)
    kv.release(0)
    assert kv.place(1, b) == 0  # b's prefix is gone
    kv.release(1)
    assert kv.place(1, a) == 2  # a's is still there


def test_a_prompt_without_room_takes_nothing_and_growth_says_when_no_block_is_free():
    kv = KVBlocks(n_blocks=3, block=4, n_rows=2, chunk=4)
    assert kv.place(0, list(range(9))) == 0 and kv.in_use() == 3
    assert kv.place(1, [1, 2]) is None and kv.tables[1] == [] and kv.in_use() == 3
    assert kv.grow(0, 12) and not kv.grow(0, 13)


def test_a_context_shift_writes_again_from_a_block_of_its_own():
    kv = KVBlocks(n_blocks=8, block=4, n_rows=2, chunk=4)
    prompt = list(range(12))
    kv.place(0, prompt)
    read_prompt(kv, 0, prompt, 0)
    assert kv.place(1, prompt + [20, 21]) == 12 and kv.tables[1][:3] == kv.tables[0]  # all three shared
    assert kv.truncate(1, 6) == 4  # keeps block 0; position 4's block is shared, so it is given back, not written
    assert kv.tables[1] == kv.tables[0][:1] and [kv.refs[b] for b in kv.tables[0]] == [2, 1, 1]
    assert kv.grow(1, 10) and not set(kv.tables[1][1:]) & set(kv.tables[0])


def test_the_engine_preempts_when_the_cache_is_full_and_answers_as_with_room(tiny_checkpoints, sp_tokenizer):
    """Eight sequences at once in a cache of 64 tokens (one full context, four blocks): a request that needs a
    block when none is free gives its blocks back to the earlier ones and is read again later; every greedy
    answer is the one it gets with room for all."""
    prompts = [[5 + i, 9, 13 + i][: 1 + i % 3] + [7] * (i % 5) * 2 for i in range(10)]
    lengths = [12 + (i * 5) % 11 for i in range(10)]
    roomy = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=8, dtype="float32")
    tight = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=8, dtype="float32",
                        kv_tokens=64)
    assert (roomy.model.n_blocks, tight.model.n_blocks) == (32, 4)
    expected, _ = engine_answers(Engine(roomy, prefill_chunk=4), prompts, lengths)
    engine = Engine(tight, prefill_chunk=4)
    got, _ = engine_answers(engine, prompts, lengths)
    assert got == expected and sum(map(len, got)) >= 100
    assert engine.metrics.registry.get_sample_value("llamadist_requests_preempted_total") > 0
    with pytest.raises(ValueError, match="load without kv_tokens"):  # Meta-style rows need a context each
        tight.generate(prompts[:2], max_gen_len=4)


def test_a_prompt_larger_than_the_whole_cache_gets_a_clear_error(tiny_checkpoints, sp_tokenizer):
    """An engine used directly (no API in front to refuse it) answers a prompt that no number of free blocks could
    hold with an error event, and goes on serving."""
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=2, kv_tokens=64)
    engine = Engine(llama, prefill_chunk=16)
    events = queue.Queue()
    engine.submit(Request([5] * 70, SamplingParams(temperature=0.0), 4, on_event=events.put))
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    error = events.get(timeout=60)
    assert error["type"] == "error" and "70 tokens do not fit the KV cache (64 tokens)" in error["message"]
    engine.stopping.set()
    loop.join(timeout=60)
    answers, _ = engine_answers(engine, [[5, 9, 13]], [4])  # the engine serves on (run again)
    assert len(answers[0]) > 0


def test_shared_prompt_prefixes_are_read_once_and_answer_as_read_whole(tiny_checkpoints, sp_tokenizer):
    """Requests whose prompts start with the same 40 tokens: later ones take the first 32 (two whole chunks of
    16) from the cache, blocks shared, and answer as when every prompt is read whole."""
    system = [(7 * i) % 300 + 3 for i in range(40)]
    prompts = [system + [5 + i, 9 + i] for i in range(4)]
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=4, dtype="float32")
    engine = Engine(llama, prefill_chunk=16)
    whole, events = engine_answers(engine, prompts, [8] * 4, cache_prompt=False)
    assert [e["timings"]["cache_n"] for e in events] == [0] * 4
    first, events = engine_answers(engine, prompts[:1], [8])
    assert first == whole[:1] and events[0]["timings"]["cache_n"] == 32  # (the first call's blocks are kept)
    shared, events = engine_answers(engine, prompts, [8] * 4)
    assert shared == whole and [e["timings"]["cache_n"] for e in events] == [32] * 4


def test_an_engine_reusing_by_block_takes_blocks_of_a_prompt_its_chunk_cut_short(tiny_checkpoints, sp_tokenizer):
    """As GPUs run it: 42-token prompts read in one chunk of 64, cut short by their end; a later prompt sharing
    the first 40 tokens takes the two whole blocks they filled (whole chunks only: none). CPUs' prompt attention
    depends on the pass, so the answers are not compared here (tests/test_gpu_kernels.py shows they agree with
    the batch-invariant kernels)."""
    system = [(7 * i) % 300 + 3 for i in range(40)]
    prompts = [system + [5 + i, 9 + i] for i in range(3)]
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=3)
    for by_block, cached in ((False, 0), (True, 32)):
        engine = Engine(llama, prefill_chunk=64)
        engine.kv = KVBlocks(engine.kv.n_blocks, engine.kv.block, engine.max_batch, 64, by_block=by_block)
        engine_answers(engine, prompts[:1], [4])
        answers, events = engine_answers(engine, prompts[1:], [4] * 2)
        assert [e["timings"]["cache_n"] for e in events] == [cached] * 2 and all(answers)

