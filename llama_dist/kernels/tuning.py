"""Autotuning that survives a restart: each shape's winning tile kept in Triton's cache on disk.

Timing every tile of every matrix shape is most of a quantized 7B model's load on a GPU, and each process picked
its own tiles, so two runs of the same model could differ in speed and in near-tied greedy tokens (RESULTS.md,
"Tiles kept on disk"). Triton keeps the timings next to its compiled kernels (TRITON_CACHE_DIR, by default
~/.triton/cache), keyed by the kernel's source, the GPU's target, Triton's version and the configs, so a change to
any of them times afresh; deleting that folder does too.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

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


def tiles_picked() -> dict[str, dict[str, str]]:
    """Each autotuned kernel that has run: its key's values -> the config it picked (benchmarks print it, so a
    device run says which tiles win where and which never do)."""
    return {name: {", ".join(map(str, k)): str(c) for k, c in tuner.cache.items()}
            for name, tuner in _TUNED.items() if tuner.cache}
