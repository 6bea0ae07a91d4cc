"""The one-token step and the packed prompt pass replayed from CUDA graphs, every one of them captured when
the model loads.

Eager decode on a GPU is launch-bound: the CPU issues a few hundred small kernels per token and the GPU
waits for them. A CUDA graph issues them all at once. Each graph is the plain step (with the installed
kernels) recorded for one batch bucket (and, where attention reads a fixed window of the cache, one
window), so nothing is compiled or recorded after start: a server is at full speed from its first
request. Capturing takes a few steps' time per graph, unlike compiling (runner/step.py), which takes
minutes for a large model.

A server's prompt pass (a step's prompt chunks packed in one row, Runner.prefill) is launch-bound too
until it holds thousands of tokens; with the packed-attention kernel installed it reads its layout from
device tensors, so a graph per token bucket replays any packing of up to that many tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..distributed.context import free_at_shutdown
from ..kernels import decode_attention
from ..kernels.fused import TritonPromptAttention
from ..model.transformer import Packed, Slots, Transformer, cache_rows, check_packed, packed_index, to_device
from .step import MIN_ATTENTION_WINDOW, attention_window

Recorder = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]

PROMPT_GRAPH_TOKENS = 4096  # the largest prompt pass replayed from a graph; longer ones are GPU-bound anyway


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes graphs are captured at: 1, 2, 4, 8, then every 8 to 64, every 16 to 128, every 32 on,
    and max_batch_size itself. A batch runs at the smallest bucket that holds it (padded rows are wasted work:
    at most an eighth of the batch past 8 rows)."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 64 else 16 if b < 128 else 32)
    return sizes + [max_batch_size]


def token_buckets(max_tokens: int) -> list[int]:
    """The prompt-pass sizes graphs are captured at: 16, 32, ... 512, then every 512, and max_tokens itself. A
    pass runs at the smallest holding it (padding is at most half the pass up to 512 tokens, where the weights'
    reads cost more than the arithmetic, and a fifth past 2048)."""
    sizes, n = [], 16
    while n < max_tokens:
        sizes.append(n)
        n = n * 2 if n < 512 else n + 512
    return sizes + [max_tokens]


def cuda_graph_recorder() -> Recorder:
    """Records a step as a CUDA graph (after warm-up runs on a side stream, which also let Triton's
    autotuner choose before recording); graphs of one recorder share a memory pool, as they never run at
    once. Returns (replay, the output tensor each replay overwrites)."""
    pool = torch.cuda.graph_pool_handle()

    def record(step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
        free_at_shutdown(graph)
        return graph.replay, out

    return record


def rerun(step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """A recorder for CPUs, which have no CUDA graphs: it keeps the step's output, and a replay runs the step
    again into it (what the tests and benchmarks/step_ab.py check everything around the graphs with)."""
    out = step()
    return (lambda: out.copy_(step())), out


@dataclass
class _Graph:
    x: torch.Tensor  # static inputs, filled before each replay
    positions: torch.Tensor
    rows: torch.Tensor
    out: torch.Tensor
    replay: Callable[[], None]
    first_rows: int = 0  # n where rows holds cache rows 0..n-1 (padded), as a step without slots asks: kept


class GraphedStep:
    """step(x, pos, slots=None) as runner/step.py's steps take it, replayed from the graph of the smallest
    bucket holding the batch; the batch is padded by repeating its last row (which writes the same key and
    value to the same cache place again; its output is dropped)."""

    def __init__(self, model: Transformer, record: Recorder | None = None):
        self.model = model
        self.buckets = batch_buckets(model.max_batch_size)
        # SDPA attends over the window it is given, with a mask: a graph per window. The Triton decode kernel
        # reads each row's cache up to its position, whatever window it is given; it launches differently for
        # short rows and long ones only.
        self.windows = decode_attention.windows(model.n_ctx) if model.decodes_by_position else sorted(
            {attention_window(p, model.n_ctx) for p in range(MIN_ATTENTION_WINDOW - 1, model.n_ctx,
                                                              MIN_ATTENTION_WINDOW)} | {model.n_ctx})
        record = record or cuda_graph_recorder()
        self.graphs = {(bucket, window): self._capture(bucket, window, record)
                       for bucket in reversed(self.buckets) for window in reversed(self.windows)}

    def _capture(self, bucket: int, window: int, record: Recorder) -> _Graph:
        model, device = self.model, self.model.device
        x = (torch.zeros((bucket, 1), dtype=torch.long, device=device) if model.is_first
             else torch.zeros((bucket, 1, model.args.dim), dtype=model.act_dtype, device=device))
        positions = torch.zeros(bucket, dtype=torch.long, device=device)
        rows = torch.zeros(bucket, dtype=torch.long, device=device)
        replay, out = record(lambda: model(x, positions, rows, length=window, last_only=True))
        return _Graph(x, positions, rows, out, replay)

    def __call__(self, x: torch.Tensor, pos: int | list[int], slots: Slots = None) -> torch.Tensor:
        n, device = x.shape[0], x.device
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None:
            raise ValueError(f"{n} rows exceed the largest captured batch, {self.buckets[-1]}.")
        last = max(pos) if isinstance(pos, list) else pos
        if last >= self.model.n_ctx:  # (a replay checks nothing: it would write past the cache)
            raise ValueError(f"Position {last} is past the cache's {self.model.n_ctx} positions; raise n_ctx.")
        graph = self.graphs[bucket, next(w for w in self.windows if w > last)]
        # each input in as few kernels as it takes (with the logits' float(), the 3 kernels saved came to 0.7% of a
        # 7B int4 token at batch 1)
        _fill(graph.x, x)
        if isinstance(pos, int):
            graph.positions.fill_(pos)
        else:
            _fill(graph.positions, to_device(pos, device))
        if slots is not None or graph.first_rows != n:
            _fill(graph.rows, cache_rows(slots, n, device))
            graph.first_rows = n if slots is None else 0
        graph.replay()
        return graph.out[:n].clone()  # the next replay overwrites out; a pipeline may still be sending this


def _fill(static: torch.Tensor, value: torch.Tensor) -> None:
    """A graph's input: value's rows, then its last row repeated over the bucket's padding."""
    n = value.shape[0]
    static[:n].copy_(value)
    if n < static.shape[0]:
        static[n:].copy_(value[-1:].expand_as(static[n:]))


@dataclass
class _PromptGraph:
    index: torch.Tensor  # tokens, positions, rows, run lengths, run ends: filled by one copy before each replay
    tokens: torch.Tensor  # [1, bucket], a view of index
    rows: torch.Tensor  # [bucket], each token's cache row: a view of index
    runs: int  # the most runs a replay holds
    out: torch.Tensor | None = None  # logits [1, runs, vocab], once recorded
    replay: Callable[[], None] | None = None


class GraphedPrompts:
    """Runner.prefill's packed pass (a model holding every layer, with TritonPromptAttention) replayed from the
    graph of the smallest token bucket holding it. The tokens are padded by repeating the last one, which joins
    its run (it writes the same key and value to the same cache place again; its output is dropped), and the
    runs by empty ones."""

    def __init__(self, model: Transformer, record: Recorder | None = None):
        self.model = model
        self.buckets = token_buckets(min(PROMPT_GRAPH_TOKENS, model.max_batch_size * model.n_ctx))
        record = record or cuda_graph_recorder()
        self.graphs = {n: self._capture(n, record) for n in reversed(self.buckets)}

    @staticmethod
    def supported(model: Transformer) -> bool:
        """Whether every layer's packed attention reads its layout from the device (a graph can hold it)."""
        return model.is_first and model.is_last and all(isinstance(b.attention, TritonPromptAttention)
                                                         for b in model.layers.values())

    def holds(self, n_tokens: int, n_runs: int) -> bool:
        """Whether a graph holds a packing of this many tokens and runs (at most one run per cache row where each
        row's sequences are consecutive, as a server step's are)."""
        return n_tokens <= self.buckets[-1] and n_runs <= self.graphs[self.buckets[-1]].runs

    def _capture(self, bucket: int, record: Recorder) -> _PromptGraph:
        model = self.model
        runs = min(bucket, model.max_batch_size)
        index = torch.zeros(3 * bucket + 2 * runs, dtype=torch.long, device=model.device)
        tokens, positions, rows, run_lengths, finals = index.split([bucket, bucket, bucket, runs, runs])
        # a layout the capture's checks accept: the bucket's tokens over rows 0, 1, ... (nothing is cached yet)
        lengths = [min(model.n_ctx, bucket - at) for at in range(0, bucket, model.n_ctx)]
        layout = (tuple(range(len(lengths))), (0,) * len(lengths), tuple(lengths))
        packed = Packed(*layout, positions, rows, run_lengths, finals)
        graph = _PromptGraph(index, tokens.view(1, bucket), rows, runs)
        self._fill(graph, *layout, [[0] * n for n in lengths])
        graph.replay, graph.out = record(lambda: model(graph.tokens, 0, packed, last_only=True))
        return graph

    def _fill(self, graph: _PromptGraph, slots: tuple[int, ...], starts: tuple[int, ...],
              lengths: tuple[int, ...], ids: list[list[int]]) -> int:
        """Write a packing into the graph's inputs; returns its number of runs."""
        positions, rows, runs, finals = packed_index(slots, starts, lengths)
        bucket, n = graph.tokens.shape[1], len(positions)
        pad, spare = bucket - n, graph.runs - len(runs)
        runs[-1] += pad
        host = ([t for part in ids for t in part] + [ids[-1][-1]] * pad + positions + [positions[-1]] * pad
                + rows + [rows[-1]] * pad + runs + [0] * spare + finals + [finals[-1]] * spare)
        graph.index.copy_(to_device(host, graph.index.device))
        return len(finals)

    def __call__(self, slots: tuple[int, ...], starts: tuple[int, ...], ids: list[list[int]],
                 resolve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The logits [runs, vocab] of each run's last token (as the model's pass of Packed.of(...) gives).
        resolve: (tokens, their cache rows) -> the tokens with each -1 replaced (Runner.resolve)."""
        lengths = tuple(map(len, ids))
        n = sum(lengths)
        check_packed(slots, starts, lengths, n, self.model.max_batch_size, self.model.n_ctx)
        graph = self.graphs[next(b for b in self.buckets if b >= n)]
        n_runs = self._fill(graph, slots, starts, lengths, ids)
        if resolve is not None:
            graph.tokens.copy_(resolve(graph.tokens, graph.rows))
        graph.replay()
        return graph.out[0, :n_runs].clone()
