"""Where a new prompt goes in the KV cache, and which of its tokens are reused (serving/slot_cache.py)."""
from llama_dist.serving.slot_cache import SlotCache


def read_prompt(cache: SlotCache, slot: int, prompt: list[int], start: int) -> None:
    """What the engine records as it reads a prompt from `start` in chunks."""
    while start < len(prompt):
        end = cache.chunk_end(start, len(prompt))
        cache.wrote(slot, start, prompt[start:end], prompt_chunk=True)
        start = end


def test_chunks_end_at_fixed_positions():
    cache = SlotCache(2, chunk=4)
    assert [cache.chunk_end(s, 10) for s in (0, 3, 4, 8, 9)] == [4, 4, 8, 10, 10]


def test_whole_aligned_chunks_are_reused_in_place_and_across_slots():
    cache = SlotCache(3, chunk=4)
    system = list(range(100, 110))  # 10 tokens: chunks [0, 4) and [4, 8) are whole, [8, 10) is not
    first = cache.place(system + [1, 2], free=[0, 1, 2])
    assert (first.reused, first.copy_from) == (0, None)
    read_prompt(cache, first.slot, system + [1, 2], 0)
    # the same slot, once free, is the one chosen; the positions of whole chunks are reused in place
    again = cache.place(system + [3, 4, 5], free=[0, 1, 2])
    assert (again.slot, again.reused, again.copy_from) == (first.slot, 8, None)
    read_prompt(cache, again.slot, system + [3, 4, 5], 8)
    # while it is busy, a third prompt copies its prefix into another slot
    other = cache.place(system + [6], free=[s for s in range(3) if s != first.slot])
    assert other.slot != first.slot and (other.reused, other.copy_from) == (8, first.slot)


def test_tokens_from_decode_steps_or_a_cut_chunk_are_not_reused():
    cache = SlotCache(1, chunk=4)
    prompt = [1, 2, 3, 4, 5, 6]
    cache.place(prompt, free=[0])
    read_prompt(cache, 0, prompt, 0)  # [0, 4) whole, [4, 6) cut short by the prompt's end
    cache.wrote(0, 6, [7])  # a decode step
    cache.wrote(0, 7, [8])
    assert cache.place(prompt + [7, 8, 9], free=[0]).reused == 4


def test_the_last_prompt_token_is_always_read_and_reuse_can_be_refused():
    cache = SlotCache(1, chunk=2)
    prompt = [1, 2, 3, 4]
    cache.place(prompt, free=[0])
    read_prompt(cache, 0, prompt, 0)
    assert cache.place(prompt, free=[0]).reused == 2  # not 4: the logits of token 4 are needed
    read_prompt(cache, 0, prompt, 2)
    assert cache.place(prompt, free=[0], reuse=False).reused == 0


def test_a_rewrite_forgets_what_followed():
    cache = SlotCache(1, chunk=2)
    cache.place([1, 2, 3, 4, 5], free=[0])
    read_prompt(cache, 0, [1, 2, 3, 4, 5], 0)
    cache.wrote(0, 2, [9, 9], prompt_chunk=True)  # a context read again from position 2 (a context shift)
    assert cache.tokens[0] == [1, 2, 9, 9] and cache.reusable[0] == 4
    assert cache.place([1, 2, 3, 4, 5, 6], free=[0]).reused == 2
