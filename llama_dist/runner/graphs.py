"""The one-token step replayed from CUDA graphs, every one of them captured when the model loads.

Eager decode on a GPU is launch-bound: the CPU issues a few hundred small kernels per token and the GPU
waits for them. A CUDA graph issues them all at once. Each graph is the plain step (with the installed
kernels) recorded for one batch bucket (and, where attention reads a fixed window of the cache, one
window), so nothing is compiled or recorded after start: a server is at full speed from its first
request. Capturing takes a few steps' time per graph, unlike compiling (runner/step.py), which takes
minutes for a large model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels.fused import FusedTransformerBlock
from ..model.transformer import Slots, Transformer, cache_rows
from .step import MIN_ATTENTION_WINDOW, attention_window

Recorder = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes graphs are captured at: 1, 2, 4, 8, then every 8 to 64, every 16 to 128, every 32 on,
    and max_batch_size itself. A batch runs at the smallest bucket that holds it (padded rows are wasted work:
    at most an eighth of the batch past 8 rows)."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 64 else 16 if b < 128 else 32)
    return sizes + [max_batch_size]


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
        return graph.replay, out

    return record


@dataclass
class _Graph:
    x: torch.Tensor  # static inputs, filled before each replay
    positions: torch.Tensor
    rows: torch.Tensor
    out: torch.Tensor
    replay: Callable[[], None]


class GraphedStep:
    """step(x, pos, slots=None) as runner/step.py's steps take it, replayed from the graph of the smallest
    bucket holding the batch; the batch is padded by repeating its last row (which writes the same key and
    value to the same cache place again; its output is dropped)."""

    def __init__(self, model: Transformer, record: Recorder | None = None):
        self.model = model
        self.buckets = batch_buckets(model.max_batch_size)
        # The Triton decode kernel reads each row's cache up to its position, whatever window it is given;
        # SDPA attends over the window it is given, with a mask: a graph per window.
        self.windowless = all(isinstance(b, FusedTransformerBlock) and b.triton_attention
                              for b in model.layers.values())
        self.windows = [model.n_ctx] if self.windowless else sorted(
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
        positions = (torch.full((n,), pos, device=device) if isinstance(pos, int)
                     else torch.tensor(pos, device=device))
        last = max(pos) if isinstance(pos, list) else pos
        window = self.model.n_ctx if self.windowless else attention_window(last, self.model.n_ctx)
        graph = self.graphs[bucket, window]
        for static, value in ((graph.x, x), (graph.positions, positions), (graph.rows, cache_rows(slots, n, device))):
            static[:n].copy_(value)
            static[n:].copy_(value[-1:].expand_as(static[n:]))
        graph.replay()
        return graph.out[:n].clone()  # the next replay overwrites out; a pipeline may still be sending this
