"""`llama-dist bench`: prefill and decode tokens/s beside the memory-bandwidth ceiling and HF transformers.

Random weights of a configs/ shape (or a real checkpoint), on whatever the launcher gives: one GPU,
torchrun over several (NCCL), or CPU. Batch-1 decode reads every weight once per token, so its
ceiling is (weight bytes per rank) / (measured read bandwidth).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint.loader import open_checkpoint
from .checkpoint.source import RandomSource
from .distributed.context import init_distributed
from .generation.llama import load_runner, make_configs
from .model.args import ModelArgs
from .runner import Runner, row_groups

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes/s of a large reduction: the read bandwidth decode can hope for."""
    x = torch.ones(int(gib * 2**30 / 2), dtype=torch.bfloat16, device=device)
    for _ in range(3):
        x.sum()
    sync(device)
    n, t = 10, time.perf_counter()
    for _ in range(n):
        x.sum()
    sync(device)
    return n * x.nbytes / (time.perf_counter() - t)


def prompt_tok_s(read_prompt: Callable[[], Any], n_tokens: int, device: torch.device) -> float:
    """Tokens/s of a prompt pass: the median of five after a warm-up (one pass's time moved by half between runs)."""
    read_prompt()
    passes = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        read_prompt()
        sync(device)
        passes.append(time.perf_counter() - start)
    return n_tokens / statistics.median(passes)


def decode_tok_s(runner: Runner, ctx, batch: int, steps: int, prompt_len: int = 16,
                 greedy: list[int] | None = None, top2: list[tuple[float, float]] | None = None) -> float:
    """Greedy decode tokens/s after a prompt of prompt_len tokens; `greedy`, if given, receives row 0's tokens and
    `top2` its two largest logits at each step (to compare runs: the same weights at any tensor-parallel size
    should choose the same tokens, except where the top two nearly tie and rounding may pick either). The top two
    come from a second pass over the same steps, each fed the token the timed pass chose: the timed steps run only
    what a user's decode runs."""
    # the same prompt on every rank (tensor-parallel ranks must feed identical tokens)
    tokens = (torch.arange(batch * prompt_len, device=ctx.device) % runner.model.args.vocab_size).view(batch, prompt_len)
    runner.forward(tokens, 0, last_only=True)
    if runner.stage.pipelined and batch > 1:
        return interleaved_tok_s(runner, ctx, tokens, steps)
    fed = [tokens[:, -1:]]  # each step's input: the prompt's last token, then each step's choice

    def advance(pos: int) -> None:
        fed.append(ctx.comm.broadcast(runner.decode(fed[-1], pos)[:, -1].argmax(-1, keepdim=True)))

    first = prompt_len + 3
    for pos in range(prompt_len, first):  # compile and warm up
        advance(pos)
    sync(ctx.device)
    start = time.perf_counter()
    for pos in range(first, first + steps):
        advance(pos)
    sync(ctx.device)
    elapsed = time.perf_counter() - start
    if greedy is not None:
        greedy.extend(torch.cat(fed[1:], dim=1)[0].tolist())
    if top2 is not None:
        tops = [runner.decode(fed[i], pos)[0, -1].float().topk(2).values
                for i, pos in enumerate(range(prompt_len, first + steps))]
        top2.extend(tuple(t) for t in torch.stack(tops).tolist())
    return batch * steps / elapsed


def interleaved_tok_s(runner: Runner, ctx, prompt: torch.Tensor, steps: int) -> float:
    """Greedy decode tokens/s of a batch on a pipeline, its row groups taking turns on the stages (as
    generation runs it)."""
    batch, start = prompt.shape
    groups = row_groups(batch, runner.stage.count)
    tokens = torch.zeros(batch, start + steps + 4, dtype=torch.long, device=ctx.device)
    tokens[:, :start] = prompt

    def run(pos: int, n: int) -> None:
        def step_done(group: int, p: int, logits: torch.Tensor | None) -> bool:
            rows = groups[group]
            chosen = (logits[:, -1].argmax(-1) if logits is not None
                      else torch.empty(rows.stop - rows.start, dtype=torch.long, device=ctx.device))
            tokens[rows, p + 1] = ctx.comm.broadcast(chosen)
            return p + 1 < pos + n

        runner.decode_interleaved(groups, pos, lambda g, p: tokens[groups[g], p:p + 1], step_done)

    run(start - 1, 3)  # warm up
    sync(ctx.device)
    t = time.perf_counter()
    run(start + 2, steps)
    sync(ctx.device)
    return batch * steps / (time.perf_counter() - t)


def hf_figures(args: ModelArgs, device: torch.device, steps: int, batches: tuple[int, ...]) -> dict[str, float]:
    """HF transformers' eager greedy decode tokens/s at our batch sizes, same shape, same device."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim,
                                      intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                                      num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                                      rms_norm_eps=args.norm_eps, tie_word_embeddings=False)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    out = {}
    for batch in batches:
        prompt = torch.randint(0, args.vocab_size, (batch, 16), device=device)
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            sync(device)
            t = time.perf_counter()
            hf.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            sync(device)
        out[f"hf_eager_decode_b{batch}"] = batch * steps / (time.perf_counter() - t)
    del hf
    return out


def bench(config: str = "llama-2-7b", model: str | None = None, batches: tuple[int, ...] = (1, 8, 32),
          steps: int = 128, prefill: int = 512, hf: bool = True, n_ctx: int = 1024, out: str | None = None,
          context: int = 16, **options: Any) -> dict:
    """options: LoadConfig / ParallelConfig fields (backend, pp, compile, ...; here quantize defaults to "none");
    out: a folder to write the JSON result into; context: the prompt's tokens before the decode steps (each
    step's attention reads that many cached positions and more)."""
    if context < 1 or context + steps + 3 > n_ctx:
        raise ValueError(f"--context {context} and --steps {steps} (+3 warm-up steps) must fit --n_ctx {n_ctx}")
    options = {"quantize": "none", **options}
    load, parallel = make_configs(model or str(config), n_ctx, max(batches), **options)
    ctx = init_distributed(parallel.backend, parallel.device, pp=parallel.pp)
    if model:
        source = open_checkpoint(model)
    else:
        path = Path(config) if Path(config).exists() else CONFIGS / f"{config}.json"
        source = RandomSource(ModelArgs.from_params_json(path), ctx.device)
    if load.dtype is None and ctx.device.type == "cuda":
        load = dataclasses.replace(load, dtype="bfloat16")
    start = time.perf_counter()
    runner = load_runner(source, ctx, load, parallel, progress=False)
    m = runner.model
    sync(ctx.device)
    result = {"config": str(config if not model else model), "world_size": ctx.world_size, "pp": ctx.pp_size,
              "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
              "load_s": time.perf_counter() - start, "quantize": load.quantize, "compile": load.compile,
              "decode_context": context}
    if ctx.device.type == "cuda":  # what the model holds on the GPU: weights in every form its kernels keep
        result["gpu_memory_gb"] = torch.cuda.memory_allocated(ctx.device) / 1e9
    weight_bytes = sum(t.nbytes for t in {t.data_ptr(): t for t in m.state_dict().values()}.values())
    bw = read_bandwidth(ctx.device, 2.0 if ctx.device.type == "cuda" else 0.5)
    result.update(weight_bytes_per_rank=weight_bytes, read_bandwidth_gbs=bw / 1e9, ceiling_tok_s=bw / weight_bytes)
    tokens = torch.randint(0, m.args.vocab_size, (1, prefill), device=ctx.device)
    # the engine's prompt pass (graphed where the kernels allow: how the server reads prompts), and the plain
    # forward pass (how Meta-style generate reads a batch of prompts)
    result["prefill_tok_s"] = prompt_tok_s(lambda: runner.prefill([(0, 0, tokens[0].tolist())]), prefill, ctx.device)
    result["prefill_forward_tok_s"] = prompt_tok_s(lambda: runner.forward(tokens, 0, last_only=True), prefill,
                                                   ctx.device)
    for b in batches:
        greedy: list[int] = []
        top2: list[tuple[float, float]] = []
        result[f"decode_b{b}_tok_s"] = decode_tok_s(runner, ctx, b, steps, context, greedy=greedy,
                                                    top2=top2 if b == 1 else None)
        if b == 1:
            result["greedy_b1"], result["top2_b1"] = greedy, top2
    if ctx.device.type == "cuda":
        from .kernels.tuning import compiled_variants, tiles_picked
        result["tiles"] = tiles_picked()
        result["compiled"] = compiled_variants()
    if "decode_b1_tok_s" in result:
        result["b1_fraction_of_ceiling"] = result["decode_b1_tok_s"] / result["ceiling_tok_s"]
    if hf and ctx.world_size == 1 and not model:
        del m, runner
        torch.cuda.empty_cache() if ctx.device.type == "cuda" else None
        result.update(hf_figures(source.args, ctx.device, min(steps, 64), batches))
    if ctx.is_driver:
        print(json.dumps(result, indent=1))
        if out:
            name = f"bench_{Path(str(model or config)).stem}_tp{ctx.tp_size}_pp{ctx.pp_size}_{load.quantize}.json"
            Path(out, name).write_text(json.dumps(result, indent=1))
    return result
