"""Autotuning that survives a restart: each shape's winning tile kept in Triton's cache on disk.

Timing every tile of every matrix shape is most of a quantized 7B model's load on a GPU, and each process picked
its own tiles, so two runs of the same model could differ in speed and in near-tied greedy tokens (RESULTS.md,
"Tiles kept on disk"). Triton keeps the timings next to its compiled kernels (TRITON_CACHE_DIR, by default
~/.triton/cache), keyed by the kernel's source (and the line it starts on), the GPU's target, Triton's version and
the configs, so a change to any of them times afresh; deleting that folder does too. Kernels that stream a decode
step's weights are timed with those weights coming from memory (streamed_time).

A kernel timed alone cannot see how it overlaps its neighbours in the step (PDL), and where two tiles tie in its
timing one may run the step slower (RESULTS.md). So a table of the tiles that ran the graphed step fastest on a
GPU model (tiles/<GPU>.json, or LLAMA_DIST_TILES; benchmarks/step_tiles.py measures them) goes first: the tuner
then times only the table's tile for that key, and everything the table lacks as before.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import triton

from ..distributed.settings import read_settings

_TUNED: dict[str, Any] = {}  # this process's autotuned kernels by name, for tiles_picked
_TABLES = Path(__file__).with_name("tiles")  # one tile table per GPU model
Table = dict[str, dict[str, dict[str, int]]]  # kernel name -> key_text -> tile_fields


def autotune(configs: list[triton.Config], key: list[str], name: str, **options: Any) -> Callable:
    """triton.autotune(configs, key, **options), with the results cached on disk where this Triton can (3.2 on)
    and the GPU's tile table first; `name` is how tiles_picked and the tables name it."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True

    pruning = options.pop("prune_configs_by", {})  # (its other entries, perf_model and top_k, kept as given)

    def tune(fn: Callable) -> Any:
        table_first = _table_first(name, key, pruning.get("early_config_prune"), read_settings().tiles)
        _TUNED[name] = triton.autotune(configs=configs, key=key, prune_configs_by={
            **pruning, "early_config_prune": table_first}, **options)(fn)
        return _TUNED[name]
    return tune


def tile_fields(config: triton.Config | dict) -> dict[str, int]:
    """A config (or its __dict__, as Triton's cache keeps it) as a tile table holds it: its meta-parameters,
    warps and stages."""
    fields = config if isinstance(config, dict) else config.__dict__
    return {**fields["kwargs"], "num_warps": fields["num_warps"], "num_stages": fields["num_stages"]}


def launch_fields(config: triton.Config) -> dict[str, int]:
    """A config's tile_fields and, where it has one, its register cap (maxnreg): what a launch with exactly this
    config passes (tile tables leave the cap out: their tiles name the configs of a list)."""
    cap = getattr(config, "maxnreg", None)  # (a Triton that has it)
    return {**tile_fields(config), **({"maxnreg": cap} if cap else {})}


def key_text(names: Sequence[str], values: Sequence[Any]) -> str:
    """A tuning key as a tile table names it: "N=4096, K=4096, ..." (the dtypes Triton adds to the key left out,
    as they do not change which tile streams a matrix fastest)."""
    return ", ".join(f"{n}={v}" for n, v in zip(names, values))


def table_path(device_name: str) -> Path:
    """Where the tile table shipped for a GPU model lives: tiles/<its name, _ for all but letters and digits>.json."""
    return _TABLES / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@functools.cache
def tile_table(path: str, required: bool = False) -> Table:
    """The tile table at `path` ({} where there is none, unless required)."""
    file = Path(path)
    if required and not file.is_file():
        raise FileNotFoundError(f"LLAMA_DIST_TILES={path}: no such file")
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a tile table, which is JSON as benchmarks/step_tiles.py writes ({e})") from e


def _table_first(name: str, key: list[str], fits: Callable | None, chosen: str) -> Callable:
    """The tuner's early_config_prune: of the configs that fit (the kernel's own early_config_prune, if any), where
    the GPU's table (`chosen`, LLAMA_DIST_TILES, else the one shipped for the GPU model) has a tile for this key
    among them, that tile alone (the tuner then only times it), else all (a table from an older list counts for
    nothing)."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
        configs = fits(configs, named_args, **kwargs) if fits else configs
        args = {**named_args, **kwargs}
        if chosen:
            table = tile_table(chosen, required=True)
        else:
            device = next(a.device for a in args.values() if isinstance(a, torch.Tensor))
            table = tile_table(str(table_path(torch.cuda.get_device_name(device))))
        row = table.get(name, {}).get(key_text(key, [args[k] for k in key]))
        return [c for c in configs if tile_fields(c) == row] or configs
    return prune


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


def tiles_picked() -> Table:
    """Each autotuned kernel that has run, as a tile table: its keys -> the tile it took (benchmarks print it, so
    a device run says which tiles win where and which never do; saved, it can be LLAMA_DIST_TILES)."""
    return {name: {key_text(tuner.keys, k): tile_fields(c) for k, c in tuner.cache.items()}
            for name, tuner in _TUNED.items() if tuner.cache}


def compiled_variants() -> list[dict[str, Any]]:
    """The autotuned kernels' variants this process has launched: each one's constexprs, warps, register cap, the
    integer arguments Triton took as multiples of 16, and the registers a thread and bytes spilled that the driver
    reports on loading it, which is what the GPU's ptxas made (a compile elsewhere, by another Triton or without
    those multiples, may differ: RESULTS.md, 34th session). Benchmarks print it beside the tiles picked."""
    variants = []
    for jit in {id(t.fn): t.fn for t in _TUNED.values()}.values():
        names = jit.arg_names
        for kernel_cache, *_ in getattr(jit, "device_caches", {}).values():
            for kernel in kernel_cache.values():
                src = getattr(kernel, "src", None)
                # (never loaded; or a Triton that keeps these otherwise: nothing reported rather than a run failed)
                if getattr(kernel, "n_regs", None) is None or not hasattr(src, "attrs"):
                    continue
                constants = {names[path[0]]: v for path, v in src.constants.items()
                             if len(path) == 1 and isinstance(v, (bool, int))}
                sixteens = [names[path[0]] for path, attrs in src.attrs.items()
                            if ["tt.divisibility", 16] in attrs and not names[path[0]].endswith("_ptr")]
                variants.append({"kernel": jit.__name__, **constants, "num_warps": kernel.metadata.num_warps,
                                 "maxnreg": getattr(kernel.metadata, "maxnreg", None), "multiples_of_16": sixteens,
                                 "registers": kernel.n_regs, "spilled": kernel.n_spills})
    return variants


def disk_timings(name: str, key: str, cache_dir: str | None = None) -> list[tuple[dict[str, int], float]]:
    """How the tuner timed each of the kernel's configs for this key (tile_fields, median ms), fastest first, as
    Triton's cache keeps them (TRITON_CACHE_DIR, else ~/.triton/cache): the latest full timing there, [] if none."""
    tuner = _TUNED[name]
    root = Path(cache_dir or os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    found = []
    for file in root.glob(f"*/{tuner.base_fn.__name__}.autotune.json"):
        kept = json.loads(file.read_text())
        if len(kept["configs_timings"]) == len(tuner.configs) and key_text(tuner.keys, kept["key"]) == key:
            found.append((file.stat().st_mtime, kept["configs_timings"]))
    if not found:
        return []
    timings = max(found, key=lambda f: f[0])[1]
    return sorted(((tile_fields(c), t[0] if isinstance(t, list) else t) for c, t in timings), key=lambda f: f[1])
