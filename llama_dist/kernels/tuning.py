"""Autotuning that survives a restart: each shape's winning tile kept in Triton's cache on disk.

Timing every tile of every matrix shape is most of a quantized 7B model's load on a GPU, and each process picked
its own tiles, so two runs of the same model could differ in speed and in near-tied greedy tokens (RESULTS.md,
"Tiles kept on disk"). Triton keeps the timings next to its compiled kernels (TRITON_CACHE_DIR, by default
~/.triton/cache), keyed by the kernel's source (and the line it starts on), the GPU's target, Triton's version and
the configs, so a change to any of them times afresh; deleting that folder does too. Kernels that stream a decode
step's weights are timed with those weights coming from memory (streamed_time).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import triton


_TUNED: dict[str, Any] = {}  # this process's autotuned kernels by name, for tiles_picked


def autotune(configs: list[triton.Config], key: list[str], name: str, **options: Any) -> Callable:
    """triton.autotune(configs, key, **options), with the results cached on disk where this Triton can (3.2 on);
    `name` is how tiles_picked reports it."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True

    def tune(fn: Callable) -> Any:
        _TUNED[name] = triton.autotune(configs=configs, key=key, **options)(fn)
        return _TUNED[name]
    return tune


_SWEEPS: dict[torch.device, torch.Tensor] = {}  # twice L2's bytes per GPU, kept for later tunings (new shapes)
_CALLS, _REPLAYS = 20, 7  # calls per graph, graph replays timed


def streamed_time(kernel_call: Callable[[], None], quantiles: tuple[float, ...]) -> list[float]:
    """The autotuner's timing for kernels that stream weights read once a decode step: ms of one call whose
    operands come from memory, launched as a step launches it (in a CUDA graph, after another kernel). A graph
    of calls each after a read of twice the L2's bytes (which evicts them), less the same graph of reads alone.
    Triton's do_bench times each launch alone after clearing L2 by writing to it (each line the kernel reads
    then also writes a dirty one back), and picked one-row tiles that ran the 7B int4 step 20% slower
    (RESULTS.md); timing calls back to back instead would read a matrix smaller than L2 from L2."""
    device = torch.device("cuda", torch.cuda.current_device())
    if device not in _SWEEPS:
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
        _SWEEPS[device] = torch.ones(l2_bytes, dtype=torch.int16, device=device)  # 2 bytes each
    sweep, total = _SWEEPS[device], torch.empty((), dtype=torch.int64, device=device)
    kernel_call()  # (compiles it)
    torch.cuda.synchronize()

    def replay_ms(with_kernel: bool) -> list[float]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(_CALLS):
                torch.sum(sweep, 0, out=total)
                if with_kernel:
                    kernel_call()
        graph.replay()
        times = []
        for _ in range(_REPLAYS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / _CALLS)
        return sorted(times)

    sweeps, both = replay_ms(False), replay_ms(True)
    return [max(both[int(q * (_REPLAYS - 1))] - sweeps[_REPLAYS // 2], 1e-4) for q in quantiles]


def tiles_picked() -> dict[str, dict[str, str]]:
    """Each autotuned kernel that has run: its key's values -> the config it picked (benchmarks print it, so a
    device run says which tiles win where and which never do)."""
    return {name: {", ".join(map(str, k)): str(c) for k, c in tuner.cache.items()}
            for name, tuner in _TUNED.items() if tuner.cache}
