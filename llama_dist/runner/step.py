"""The one-token step of a stage: the model's forward for one token per row, compiled or not."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..model.transformer import Slots, Transformer

MIN_ATTENTION_WINDOW = 256  # the shortest cache prefix a compiled step attends over

Step = Callable[..., torch.Tensor]


def attention_window(pos: int, n_ctx: int) -> int:
    """The cache prefix a compiled step at `pos` attends over: a power of two (at least
    MIN_ATTENTION_WINDOW) holding pos + 1, so a few graphs cover every position and a step reads
    at most twice the cache it needs instead of all of it."""
    window = MIN_ATTENTION_WINDOW
    while window < pos + 1:
        window *= 2
    return min(window, n_ctx)


def batch_bucket(rows: int, max_batch_size: int) -> int:
    """The batch size a compiled step runs `rows` rows at: a power of two (at most max_batch_size),
    so a server's changing batch needs a few graphs, not one per size."""
    return min(1 << (rows - 1).bit_length(), max_batch_size)


def make_step(model: Transformer, compile: bool, fast_all_reduce: bool = False) -> Step:
    """step(x, pos, slots=None) -> the stage's output for one token per row (the logits [B, 1, vocab] where one
    stage holds every layer): x is the tokens [B, 1] on the first stage, else the hidden state the stage before
    produced; sends and receives are the caller's.

    pos: one position for every row (an int) or a list of per-row positions; slots: the cache rows, as indices
    (the server's continuous batching) or a slice of consecutive rows (a pipeline's row group; None: rows
    0..B-1). Compiled, it attends over a power-of-two window of the cache with a mask, and a batch with slot
    indices is padded to a power-of-two size by repeating its last row (which writes the same key and value to
    the same cache place again; its output is dropped), so few shapes occur: on GPUs a CUDA graph each.
    fast_all_reduce: let the graphs' all-reduces take the communicator's faster route (GPUs). Eager, it attends
    over the filled part only."""
    if not compile:
        return lambda x, pos, slots=None: model(x, pos if isinstance(pos, int) else torch.tensor(pos, device=x.device),
                                                slots, last_only=True)
    on_gpu = model.device.type == "cuda"
    if on_gpu and fast_all_reduce:
        model.comm.enable_fast_all_reduce(model.max_batch_size * model.args.dim, model.act_dtype, model.device)
    windows = math.ceil(math.log2(max(model.n_ctx / MIN_ATTENTION_WINDOW, 1))) + 1
    buckets = model.max_batch_size.bit_length() + 1
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, windows * buckets + 2)

    def forward(x: torch.Tensor, positions: torch.Tensor, window: int, slots: Slots) -> torch.Tensor:
        return model(x, positions, slots, length=window, last_only=True)

    # Guards on the model's modules cost about a millisecond per call (every layer's attributes, checked every
    # token) and the model never changes after loading, so they are skipped. Compiled graphs are cached per
    # code object: a code object of this model's own keeps another model from matching its graphs.
    forward.__code__ = forward.__code__.replace()
    # GPUs: static shapes, a CUDA graph per batch bucket and window. CPUs: a graph takes a minute to
    # compile there, so a shape that changes (batch size, window) is recompiled once as dynamic instead.
    step = torch.compile(forward, fullgraph=on_gpu, dynamic=False if on_gpu else None,
                         options={"triton.cudagraphs": on_gpu,  # what mode="reduce-overhead" sets
                                  # CPUs: a C++ wrapper calls the kernels, not Python
                                  "cpp_wrapper": not on_gpu,
                                  "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def run(x: torch.Tensor, pos: int | list[int], slots: Slots = None) -> torch.Tensor:
        rows, device = x.shape[0], x.device
        if isinstance(pos, int):
            positions, last = torch.full((rows,), pos, device=device), pos
        else:
            positions, last = torch.tensor(pos, device=device), max(pos)
        window = attention_window(last, model.n_ctx)
        if not isinstance(slots, torch.Tensor):  # all rows, or consecutive ones: shapes repeat anyway
            return step(x, positions, window, slots)
        pad = batch_bucket(rows, model.max_batch_size) - rows
        if pad:
            x, positions, slots = (torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in (x, positions, slots))
        return step(x, positions, window, slots)[:rows]

    return run
