"""Rank 0's record of the paged KV cache: which blocks each sequence's cache row holds, which are free, and
which hold prompt prefixes kept for reuse.

The model's cache is blocks of KV_BLOCK positions and a block table per cache row (model/transformer.py). A
sequence takes blocks as it grows, so the tokens in use bound how many sequences run, not rows x n_ctx; when
none is free, the engine preempts a sequence (it is read again later, from what is still cached).

Prefix caching (vLLM's automatic prefix caching; llama.cpp's prompt cache, across slots): a full block of
prompt tokens is registered under its tokens and those before it, and a later prompt that starts with the same
tokens takes those blocks into its table, shared (counted), instead of reading them again: a system prompt or
a chat history that many requests share is read once and held once. A block whose last holder ends stays
registered, on the free list, until it is the least recently freed and a new block is needed.

Reuse is exact: prompts are read in chunks whose bounds are fixed positions (multiples of `chunk`), and only
blocks written by whole chunks read that way are registered, and reused in whole chunks, so a reused prefix
holds the very numbers reading the prompt would have produced. (A token's keys and values from a decode step,
or from a chunk cut short by the prompt's end, come from other arithmetic; reusing them could change a greedy
answer.) With `by_block`, for GPUs, blocks of any prompt pass are registered and reused block by block: a
prompt then reads only what follows its last shared block (16 tokens, not up to a chunk). There a token's keys
and values do not depend on the pass that read it where a row's arithmetic does not depend on its batch
(kernels/invariant.py), and nothing is exact otherwise: cuBLAS already sums a chunk by the pass's size. Blocks
that decode steps wrote are never registered (another attention kernel computed them).
"""
from __future__ import annotations

import math
from collections import OrderedDict


class KVBlocks:
    def __init__(self, n_blocks: int, block: int, n_rows: int, chunk: int, by_block: bool = False):
        self.block, self.chunk, self.n_blocks, self.by_block = block, chunk, n_blocks, by_block
        # prefixes are reused in whole blocks of whole chunks, or by_block in whole blocks
        self.reuse_unit = block if by_block else math.lcm(block, chunk)
        self.refs = [0] * n_blocks
        # free blocks, taken from the front: unregistered ones first, then registered ones least recently freed
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n_blocks))
        self.registered: dict[int, int] = {}  # key -> block
        self.content: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # registered block -> (key, parent, tokens)
        self.tables: list[list[int]] = [[] for _ in range(n_rows)]
        self.exact = [0] * n_rows  # leading positions written by whole aligned prompt chunks (by_block: by prompts)
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]  # each row's tokens at those positions
        self.keys: list[list[int]] = [[] for _ in range(n_rows)]  # keys of the row's leading reusable blocks
        self.changes: list[tuple[int, int, int]] = []  # (row, index in its table, block) since take_changes

    def chunk_end(self, start: int, end: int) -> int:
        """Where a chunk of the tokens start..end-1 that begins at `start` ends: at the next multiple of
        `chunk`, or at `end`."""
        return min(end, (start // self.chunk + 1) * self.chunk)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block)

    def in_use(self) -> int:
        """Blocks some row holds."""
        return self.n_blocks - len(self.free)

    def place(self, row: int, prompt: list[int], reuse: bool = True) -> int | None:
        """Give an empty row blocks for this prompt, starting with the registered blocks of its longest cached
        prefix (in whole reuse units; the prompt's last token is always read again, its logits choose the first
        answer token). Returns how many of the prompt's tokens are cached that way, or None where too few blocks
        are free now (the row stays empty)."""
        assert not self.tables[row], row
        shared, keys, parent = [], [], 0
        for i in range((len(prompt) - 1) // self.block if reuse else 0):
            tokens = tuple(prompt[i * self.block:(i + 1) * self.block])
            key = hash((parent, tokens))
            found = self.registered.get(key)
            if found is None or self.content[found] != (key, parent, tokens):
                break
            shared.append(found)
            keys.append(key)
            parent = key
        reused = len(shared) * self.block // self.reuse_unit * self.reuse_unit
        shared, keys = shared[:reused // self.block], keys[:reused // self.block]
        new = self.blocks_for(len(prompt)) - len(shared)
        if new > len(self.free) - sum(self.refs[b] == 0 for b in shared):
            return None
        for b in shared:
            if self.refs[b] == 0:
                del self.free[b]
            self.refs[b] += 1
        self.tables[row] = shared + [self._take() for _ in range(new)]
        self.tokens[row], self.exact[row], self.keys[row] = prompt[:reused], reused, keys
        self.changes += [(row, i, b) for i, b in enumerate(self.tables[row])]
        return reused

    def grow(self, row: int, n_tokens: int) -> bool:
        """Blocks for the row's positions 0..n_tokens-1; False (and nothing taken) where too few are free."""
        more = self.blocks_for(n_tokens) - len(self.tables[row])
        if more > len(self.free):
            return False
        table = self.tables[row]
        for _ in range(more):
            table.append(self._take())
            self.changes.append((row, len(table) - 1, table[-1]))
        return True

    def wrote(self, row: int, start: int, tokens: list[int], prompt_chunk: bool = False) -> None:
        """A step writes these tokens' keys and values at start.. in this row; prompt_chunk: as a chunk of a
        prompt (or of a context read again), whose bounds chunk_end gave. Blocks that whole aligned chunks (or
        by_block, prompt chunks) have now filled are registered."""
        assert self.blocks_for(start + len(tokens)) <= len(self.tables[row]), (row, start)
        if start < self.exact[row]:
            self.exact[row] = start
            del self.tokens[row][start:], self.keys[row][start // self.block:]
        whole = start % self.chunk == 0 and len(tokens) == self.chunk
        if not (prompt_chunk and start == self.exact[row] and (whole or self.by_block)):
            return
        held, keys = self.tokens[row], self.keys[row]
        held.extend(tokens)
        self.exact[row] += len(tokens)
        while (len(keys) + 1) * self.block <= self.exact[row]:
            i = len(keys)
            parent, block = keys[-1] if keys else 0, self.tables[row][i]
            content = tuple(held[i * self.block:(i + 1) * self.block])
            key = hash((parent, content))
            if key not in self.registered and block not in self.content:
                self.registered[key] = block
                self.content[block] = (key, parent, content)
            keys.append(key)

    def truncate(self, row: int, n_tokens: int) -> int:
        """Keep the row's first positions (a context shift keeps n_tokens and writes what follows again), from
        the start of the block holding position n_tokens: a block may be shared or registered, so it is given
        back rather than written into. Returns how many positions the row keeps."""
        keep = n_tokens // self.block
        self._give_back(self.tables[row][keep:])
        del self.tables[row][keep:], self.tokens[row][keep * self.block:], self.keys[row][keep:]
        self.exact[row] = min(self.exact[row], keep * self.block)
        return keep * self.block

    def release(self, row: int) -> None:
        """The row's sequence has ended (or was preempted): its blocks go back (registered ones stay findable)."""
        self._give_back(self.tables[row])
        self.tables[row], self.tokens[row], self.keys[row], self.exact[row] = [], [], [], 0

    def take_changes(self) -> list[tuple[int, int, int]]:
        """(row, index in its table, block) for each table entry set since the last call: for the model's block
        table (a row given back keeps its stale entries, which nothing reads)."""
        changes, self.changes = self.changes, []
        return changes

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        if block in self.content:  # the least recently freed registered block: forgotten now
            key, _, _ = self.content.pop(block)
            del self.registered[key]
        self.refs[block] = 1
        return block

    def _give_back(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None  # at the back: registered blocks are kept longest
                if block not in self.content:
                    self.free.move_to_end(block, last=False)
