"""The graphed batch-1 decode step under several settings, timed in one process: one loaded model, a graph per
window captured for each arm with module constants set as the arm says (then restored), the arms timed in turn,
round after round. One process, one set of weights and one tuning: differences of half a percent show (the 30th to
33rd sessions' A/Bs, RESULTS.md), where separate processes differ by their tuners' picks.

An arm is "name=module.NAME:value,module.NAME:value" (values as Python literals), or "name=" for the tree as it
is; NAME may go on into what it holds, by attribute, list index and dict key: "module.NAME[6].attr.key:value" (a
tuner's config: `llama_dist.kernels.gemv_triton._INT4_CONFIGS[6].maxnreg:96`, the 32x1024 tile compiled within 96
registers; `..._INT4_CONFIGS[6].kwargs.BLOCK_N:64`, every matrix that takes it with 64 rows a program). A setting
"tuner[FIELD=v;...]:FIELD=v;..." gives the matrices whose tuning keys match the first fields (the one-row
kernel's tuners as tiles_picked names them: gemv, gemv_int4, gemv_int8) a tile of their own, the tile they took
with the second fields changed: `gemv_int4[N=22016]:BLOCK_N=32;BLOCK_K=1024;maxnreg=128` (w1/w3 of 7B alone;
maxnreg=None uncaps); one decode step runs before the arms are captured, so that the tuners have picked. Each arm
decodes greedily `steps` tokens from each context, the median of 3 runs a round (a "*" after an arm's figure: its
first 20 tokens differ from the first arm's; an arm whose kernels leave split-K tickets set stops the run, as the
arms share them). The last line, JSON, holds the figures and, on a GPU, each kernel variant the arms loaded with its
registers and spills (`compiled`). On CPUs the step runs again instead of replaying a graph.

    python benchmarks/step_ab.py --config llama-2-7b --quantize int4 --contexts "(16,1000)" \\
        --arms "('main=', 'tile32=llama_dist.kernels.decode_attention.WHOLE_L:32')"
"""
import ast
import dataclasses
import importlib
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist.bench import CONFIGS, sync  # noqa: E402
from llama_dist.checkpoint.source import RandomSource  # noqa: E402
from llama_dist.distributed.context import init_distributed  # noqa: E402
from llama_dist.generation.llama import load_runner, make_configs  # noqa: E402
from llama_dist.model.args import ModelArgs  # noqa: E402
from llama_dist.runner.graphs import GraphedStep, rerun  # noqa: E402

Setting = tuple[Any, str | int, Any]  # (what holds it, its attribute, index or key, value)
TILE = re.compile(r"(\w+)\[(\w+=[^\]]+)\]$")  # tuner[FIELD=v;...]


@dataclasses.dataclass
class TileSetting:
    """A tile for the matrices whose tuning keys match `keys`: the tile each took, with `fields` changed. Resolved
    when its arm is captured, after the tuners have picked (resolve)."""
    tuner: str
    keys: dict[str, Any]
    fields: dict[str, Any]


def _fields(text: str) -> dict[str, Any]:
    """"A=1;B=None" -> {"A": 1, "B": None}."""
    pairs = [item.partition("=") for item in filter(None, text.split(";"))]
    if not pairs or any(not name.strip().isidentifier() or not eq or not value.strip() for name, eq, value in pairs):
        raise ValueError(f"{text!r} is not FIELD=value;...")
    return {name.strip(): ast.literal_eval(value.strip()) for name, _, value in pairs}


def resolve(setting: Setting | TileSetting) -> list[Setting]:
    """A setting as what it sets: a TileSetting as each matching key's entry in its tuner's cache, set to a
    config of the tile it took with the fields changed."""
    if not isinstance(setting, TileSetting):
        return [setting]
    import triton

    from llama_dist.kernels.tuning import _TUNED, launch_fields
    if setting.tuner not in _TUNED:
        raise ValueError(f"No tuner {setting.tuner!r} has run (those that have: {sorted(_TUNED)}).")
    tuner, found = _TUNED[setting.tuner], []
    for key, config in tuner.cache.items():
        named = dict(zip(tuner.keys, key))
        if all(named.get(k) == v for k, v in setting.keys.items()):
            fields = {**launch_fields(config), **setting.fields}
            options = {k: fields.pop(k) for k in ("num_warps", "num_stages")}
            cap = fields.pop("maxnreg", None)  # (None in the setting: uncapped)
            if cap is not None:
                options["maxnreg"] = cap
            found.append((tuner.cache, key, triton.Config(fields, **options)))
    if not found:
        raise ValueError(f"{setting.tuner} took no tile for a key with {setting.keys}.")
    return found


def _by_item(owner: Any, key: str | int) -> bool:
    """Whether `key` names an item of owner (a list's index, a dict's key) rather than an attribute."""
    return isinstance(key, int) or isinstance(owner, dict)


def _get(owner: Any, key: str | int) -> Any:
    return owner[key] if _by_item(owner, key) else getattr(owner, key)


def _set(owner: Any, key: str | int, value: Any) -> None:
    if _by_item(owner, key):
        owner[key] = value
    else:
        setattr(owner, key, value)


def _holds(owner: Any, key: str | int) -> bool:
    if isinstance(key, int):
        return -len(owner) <= key < len(owner)
    return key in owner if isinstance(owner, dict) else hasattr(owner, key)


def parse_target(target: str) -> tuple[Any, str | int]:
    """"module.NAME" or "module.NAME[i].attr.key..." -> (what holds the last attribute, index or key, that
    attribute, index or key). One that does not exist is refused: setting it would change nothing, and the arm
    would time the tree as it is under another name."""
    head, bracket, rest = target.partition("[")
    module_name, _, attr = head.rpartition(".")
    steps = re.findall(r"\[(\d+)\]|\.([A-Za-z_]\w*)", bracket + rest)
    keys: list[str | int] = [attr] + [int(i) if i else n for i, n in steps]
    if not module_name or not attr.isidentifier() or "".join(
            f"[{i}]" if i else f".{n}" for i, n in steps) != bracket + rest:
        raise ValueError(f"{target!r} is not module.NAME, with [index] and .attr after it")
    owner, where = importlib.import_module(module_name), module_name
    for n, key in enumerate(keys):
        if not _holds(owner, key):
            raise ValueError(f"{where} has no {key}.")
        if n < len(keys) - 1:
            owner, where = _get(owner, key), f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"
    return owner, keys[-1]


def parse_arm(text: str) -> tuple[str, list[Setting | TileSetting]]:
    """"name=module.NAME:value,..." (or tuner[...]:..., a TileSetting) -> (name, the settings)."""
    name, eq, rest = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"Arm {text!r} is not name=settings (\"name=\" for the tree as it is).")
    settings: list[Setting | TileSetting] = []
    for item in filter(None, rest.split(",")):
        target, _, value = item.partition(":")
        if not value.strip():
            raise ValueError(f"Arm {name!r}: {item!r} is not module.NAME:value.")
        try:
            tile = TILE.match(target.strip())
            if tile:
                settings.append(TileSetting(tile[1], _fields(tile[2]), _fields(value)))
                continue
            owner, key = parse_target(target.strip())
        except ValueError as e:
            raise ValueError(f"Arm {name!r}: {e}") from None
        settings.append((owner, key, ast.literal_eval(value.strip())))
    return name.strip(), settings


def parse_arms(arms: Any) -> dict[str, list[Setting | TileSetting]]:
    """--arms as {name: settings}, in order. Refused: a string instead of a tuple (what fire passes when the tuple
    does not parse, e.g. a quote inside an arm ends its string; it would be timed one arm per character) and a name
    given twice (the later would replace the earlier); parse_arm refuses an arm without "name="."""
    if isinstance(arms, str) or not all(isinstance(a, str) for a in arms):
        raise ValueError(f"--arms is not a tuple of strings: {arms!r}. Write it as \"('main=', "
                         f"'name=module.NAME:value')\", with no quote of the same kind inside an arm.")
    named: dict[str, list[Setting | TileSetting]] = {}
    for text in arms:
        name, settings = parse_arm(text)
        if name in named:
            raise ValueError(f"Two arms are named {name!r}.")
        named[name] = settings
    return named


def capture(model, settings: list[Setting | TileSetting]) -> GraphedStep:
    """The model's graphed step captured with these settings in force (restored after)."""
    settings = [s for setting in settings for s in resolve(setting)]
    before = [(owner, key, _get(owner, key)) for owner, key, _ in settings]
    for owner, key, value in settings:
        _set(owner, key, value)
    try:
        return GraphedStep(model, record=None if model.device.type == "cuda" else rerun)
    finally:
        for owner, key, value in reversed(before):
            _set(owner, key, value)


def decode(step: GraphedStep, prompt: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    """Greedy tokens [steps] from the prompt's token at `start`."""
    token, out = prompt[:, start:start + 1], []
    for pos in range(start, start + steps):
        token = step(token, pos)[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, 1)[0]


def check_tickets(arm: str, device: torch.device) -> None:
    """Refuse to go on after an arm whose kernels left split-K tickets set: the arms share the tickets, and every
    arm timed after it would skip rows (the 38th session timed such an arm's successors as a gain)."""
    if device.type != "cuda":
        return
    from llama_dist.kernels.gemv_triton import tickets_left
    if left := tickets_left():
        raise RuntimeError(f"Arm {arm!r} left {left} split-K tickets set: its kernels break the ticket protocol, "
                           f"and the arms after it would run with them. Time it in a process of its own.")


def main(arms: tuple[str, ...], config: str = "llama-2-7b", quantize: str = "none", contexts: tuple = (16,),
         steps: int = 128, rounds: int = 3) -> None:
    named = parse_arms(arms)  # (before the model loads: a mistyped arm costs nothing)
    contexts = (contexts,) if isinstance(contexts, int) else tuple(contexts)
    n_ctx = max(contexts) + steps + 8
    load, parallel = make_configs(config, n_ctx, 1, quantize=quantize)
    ctx = init_distributed(parallel.backend, parallel.device)
    if load.dtype is None and ctx.device.type == "cuda":
        load = dataclasses.replace(load, dtype="bfloat16")
    path = Path(config) if Path(config).exists() else CONFIGS / f"{config}.json"
    runner = load_runner(RandomSource(ModelArgs.from_params_json(path), ctx.device), ctx, load, parallel,
                         progress=False)
    model = runner.model
    prompt = (torch.arange(n_ctx - 8, device=ctx.device) % model.args.vocab_size)[None]
    model(prompt[:, :1], 0)  # (a decode step: the one-row kernels' tuners pick their tiles)
    graphed = {name: capture(model, settings) for name, settings in named.items()}
    for name, step in graphed.items():
        print(f"{name}: windows {step.windows}", flush=True)
    model(prompt, 0)  # every arm then writes the same cache places again
    first = next(iter(graphed))
    tok_s: dict[str, dict[int, list[float]]] = {name: {c: [] for c in contexts} for name in graphed}
    for r in range(rounds):
        for c in contexts:
            tokens = {}
            for name, step in graphed.items():
                decode(step, prompt, c, 4)
                times = []
                for _ in range(3):
                    sync(ctx.device)
                    start = time.perf_counter()
                    tokens[name] = decode(step, prompt, c, steps)
                    sync(ctx.device)
                    times.append(time.perf_counter() - start)
                tok_s[name][c].append(steps / statistics.median(times))
                check_tickets(name, ctx.device)
            print(f"round {r} context {c}: " + "  ".join(
                f"{name} {tok_s[name][c][-1]:.1f}{'' if torch.equal(tokens[name][:20], tokens[first][:20]) else '*'}"
                for name in graphed), flush=True)
    compiled = []
    if ctx.device.type == "cuda":  # (Triton is imported only for CUDA models)
        from llama_dist.kernels.tuning import compiled_variants
        compiled = compiled_variants()
    print(json.dumps({"config": config, "quantize": quantize, "steps": steps, "tok_s": tok_s,
                      "device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu",
                      "compiled": compiled}))


if __name__ == "__main__":
    fire.Fire(main)
