"""Which cache slot a new request takes, and how much of its prompt is already there.

A slot keeps the keys and values of the tokens it last held after its request ends (llama.cpp's prompt
cache). A new prompt goes to the free slot holding the longest prefix of it, and when another slot (busy
or free) holds a longer one, that prefix is copied across instead of read again: a system prompt or a
chat history shared by many requests is read once. Copying a token's keys and values moves a few hundred
kilobytes; reading it again runs the whole model.

Reuse is exact: prompts are read in chunks whose bounds are fixed positions (multiples of `chunk`), and
only whole chunks read that way are reused, so a reused prefix holds the very numbers reading the prompt
would have produced. (A token's keys and values from a decode step, or from a chunk cut short by the
prompt's end, come from other arithmetic; reusing them could change a greedy answer.)
"""
from __future__ import annotations

from dataclasses import dataclass


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class Placement:
    slot: int
    reused: int  # prompt tokens whose keys and values are already in the slot (after the copy, if any)
    copy_from: int | None = None  # the slot to copy those `reused` positions from; None: they are in place


class SlotCache:
    """Rank 0's record of the KV cache: the tokens each slot holds at positions 0..n-1, and how many of the
    first ones came from whole aligned prompt chunks (those may be reused)."""

    def __init__(self, n_slots: int, chunk: int):
        self.chunk = chunk
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.reusable = [0] * n_slots
        self.last_used = [0] * n_slots
        self.clock = 0

    def chunk_end(self, start: int, end: int) -> int:
        """Where a chunk of the tokens start..end-1 that begins at `start` ends: at the next multiple of
        `chunk`, or at `end`."""
        return min(end, (start // self.chunk + 1) * self.chunk)

    def place(self, prompt: list[int], free: list[int], reuse: bool = True) -> Placement:
        """A free slot for this prompt. The prompt's last token is always read again (its logits choose the
        first answer token). Without reuse, or when no slot shares a prefix, the least recently used free
        slot is taken, keeping recent prefixes longest."""
        usable = len(prompt) - 1 if reuse else 0

        def shared(slot: int) -> int:
            n = min(common_prefix(self.tokens[slot], prompt), usable, self.reusable[slot])
            return n - n % self.chunk

        slot = max(free, key=lambda s: (shared(s), -self.last_used[s]))
        source = max(range(len(self.tokens)), key=shared)
        self.clock += 1
        self.last_used[slot] = self.clock
        placement = (Placement(slot, shared(source), copy_from=source) if shared(source) > shared(slot)
                     else Placement(slot, shared(slot)))
        self.tokens[slot] = prompt[:placement.reused]
        self.reusable[slot] = placement.reused
        return placement

    def wrote(self, slot: int, start: int, tokens: list[int], prompt_chunk: bool = False) -> None:
        """A step writes these tokens' keys and values at start.. in this slot; prompt_chunk: as a chunk of a
        prompt (or of a context read again), whose bounds chunk_end gave."""
        held = self.tokens[slot]
        assert start <= len(held), (slot, start, len(held))
        del held[start:]
        held.extend(tokens)
        self.reusable[slot] = min(self.reusable[slot], start)
        if prompt_chunk and start == self.reusable[slot] and len(tokens) == self.chunk:
            self.reusable[slot] += self.chunk
