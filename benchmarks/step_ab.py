"""The graphed batch-1 decode step under several settings, timed in one process: one loaded model, a graph per
window captured for each arm with module constants set as the arm says (then restored), the arms timed in turn,
round after round. One process, one set of weights and one tuning: differences of half a percent show (the 30th to
33rd sessions' A/Bs, RESULTS.md), where separate processes differ by their tuners' picks.

An arm is "name=module.NAME:value,module.NAME:value" (values as Python literals), or "name=" for the tree as it
is. Each arm decodes greedily `steps` tokens from each context, the median of 3 runs a round (a "*" after an arm's
figure: its first 20 tokens differ from the first arm's). On CPUs the step runs again instead of replaying a graph.

    python benchmarks/step_ab.py --config llama-2-7b --quantize int4 --contexts "(16,1000)" \\
        --arms "('main=', 'tile32=llama_dist.kernels.decode_attention.WHOLE_L:32')"
"""
import ast
import dataclasses
import importlib
import json
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

Setting = tuple[Any, str, Any]  # (module, name, value)


def parse_arm(text: str) -> tuple[str, list[Setting]]:
    """"name=module.NAME:value,..." -> (name, the settings). A NAME the module lacks is refused: setting it would
    change nothing, and the arm would time the tree as it is under another name."""
    name, _, rest = text.partition("=")
    settings = []
    for item in filter(None, rest.split(",")):
        target, _, value = item.partition(":")
        module_name, _, attr = target.strip().rpartition(".")
        if not module_name or not value.strip():
            raise ValueError(f"Arm {name!r}: {item!r} is not module.NAME:value.")
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):
            raise ValueError(f"Arm {name!r}: {module_name} has no {attr}.")
        settings.append((module, attr, ast.literal_eval(value.strip())))
    return name.strip(), settings


def capture(model, settings: list[Setting]) -> GraphedStep:
    """The model's graphed step captured with these settings in force (restored after)."""
    before = [(module, attr, getattr(module, attr)) for module, attr, _ in settings]
    for module, attr, value in settings:
        setattr(module, attr, value)
    try:
        return GraphedStep(model, record=None if model.device.type == "cuda" else rerun)
    finally:
        for module, attr, value in before:
            setattr(module, attr, value)


def decode(step: GraphedStep, prompt: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    """Greedy tokens [steps] from the prompt's token at `start`."""
    token, out = prompt[:, start:start + 1], []
    for pos in range(start, start + steps):
        token = step(token, pos)[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, 1)[0]


def main(arms: tuple[str, ...], config: str = "llama-2-7b", quantize: str = "none", contexts: tuple = (16,),
         steps: int = 128, rounds: int = 3) -> None:
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
    named = dict(map(parse_arm, arms))
    graphed = {name: capture(model, settings) for name, settings in named.items()}
    for name, step in graphed.items():
        print(f"{name}: windows {step.windows}", flush=True)
    prompt = (torch.arange(n_ctx - 8, device=ctx.device) % model.args.vocab_size)[None]
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
            print(f"round {r} context {c}: " + "  ".join(
                f"{name} {tok_s[name][c][-1]:.1f}{'' if torch.equal(tokens[name][:20], tokens[first][:20]) else '*'}"
                for name in graphed), flush=True)
    print(json.dumps({"config": config, "quantize": quantize, "steps": steps, "tok_s": tok_s,
                      "device": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"}))


if __name__ == "__main__":
    fire.Fire(main)
