"""`llama-dist` command line: the same SPMD program under python, torchrun, mpirun or srun.

MODEL is a Meta folder, a Hugging Face folder, a .gguf file, or `smollm2` (the bundled GGUF).
Each command builds its load and parallel configs once, from its own flags and these shared ones.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import fire

from .generation.llama import Llama, make_configs

OPTIONS = """Shared options (generate, chat, serve, perplexity, bench):
  --tokenizer PATH        the model's tokenizer, where the model does not carry one
  --dtype float32|bfloat16|float16   activations and dense weights (default: bf16 on GPUs, fp32 on CPUs)
  --quantize auto|none|int8|int4     auto keeps what the file stores quantized (default)
  --group_size 32         int4 group size
  --compile               compile the one-token decode step (inductor on CPU, CUDA graphs on GPUs); the first
                          steps pay for compilation
  --cuda_graphs False     GPUs without --compile: run the decode step eagerly instead of replaying CUDA graphs
                          captured at load (one per batch bucket; seconds to capture)
  --batch_invariant       GPUs: kernels whose rows compute the same whatever shares their batch, so a greedy
                          answer does not depend on what else runs (slower; dense weights)
  --backend auto|nccl|gloo|mpi       collectives between ranks (auto: NCCL on GPUs, else Gloo)
  --device cuda:0|cpu     where this rank runs (default: its GPU, else the CPU)
  --pp N                  pipeline stages (ranks = TP x N); --pp_split 10,20 layers per stage;
  --micro_batches N       parts a batch is cut into so the stages work at once (default N = pp)"""


def _with_options(command):
    command.__doc__ = f"{command.__doc__}\n\n{OPTIONS}"
    return command


def _prompts(prompt: str | list[str] | tuple[str, ...]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]


def _listed(value: Any) -> str | None:
    """A comma-separated flag as one string (Fire reads "a,b" as a tuple)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else None if value is None else str(value)


@_with_options
def generate(prompt: str | list[str] = "I believe the meaning of life is", model: str = "smollm2",
             max_gen_len: int = 64, temperature: float = 0.6, top_p: float = 0.9, n_ctx: int = 512, seed: int = 1,
             **options: Any) -> None:
    """Complete each prompt (--prompt may be a list) and print prompt + completion on rank 0 (batched by the
    serving engine, sampled as Meta's generate samples)."""
    from .generation.sampling import SamplingParams
    from .serving.interactive import answers

    prompts = _prompts(prompt)
    llama = Llama.from_config(*make_configs(model, n_ctx, len(prompts), **options), seed=seed)
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    texts = answers(llama, ids, SamplingParams.meta(temperature, top_p), max_gen_len, seed)
    for p, text in zip(prompts, texts or []):
        print(p + text)


@_with_options
def chat(prompt: str | list[str] | None = None, model: str = "smollm2", system: str | None = None,
         max_gen_len: int = 256, temperature: float | None = None, top_p: float = 0.9, n_ctx: int = 2048,
         chat_template: str | None = None, seed: int = 1, raw: bool = False, **options: Any) -> None:
    """Without --prompt: an interactive chat (--raw: Meta's "Enter prompt:" completion loop).
    With --prompt: answer each as a one-turn chat, in the model's own chat format, and exit.
    --temperature defaults to 0.7 interactively and 0 (greedy) for --prompt."""
    from .generation.sampling import SamplingParams
    from .serving.interactive import answers, interactive
    from .tokenizer.chat import encode_dialog

    if prompt is None:
        params = SamplingParams.meta(0.7 if temperature is None else temperature, top_p)
        return interactive(*make_configs(model, n_ctx, 1, **options), system, raw, params, max_gen_len)
    prompts = _prompts(prompt)
    llama = Llama.from_config(*make_configs(model, n_ctx, len(prompts), **options), seed=seed)
    head = [{"role": "system", "content": system}] if system else []
    ids = [encode_dialog(head + [{"role": "user", "content": p}], llama.tokenizer, chat_template) for p in prompts]
    texts = answers(llama, ids, SamplingParams.meta(temperature or 0.0, top_p), max_gen_len, seed)
    for p, text in zip(prompts, texts or []):
        print(f"> {p}\n{text}\n")


def convert(model: str, out: str, to: str = "meta", mp: int = 1, dtype: str = "float32") -> None:
    """Write MODEL as a Meta checkpoint with --mp shards (--to meta) or as HF safetensors (--to hf)."""
    from .convert import convert as run

    path = run(model, out, to=to, mp=mp, dtype=dtype)
    print(f"Wrote {to} checkpoint to {path}")


def quantize(model: str, out: str, type: str = "int8", group_size: int = 32) -> None:
    """Write MODEL with int8 (per channel) or int4 (--group-size) linear weights; it loads at any TP size."""
    from .checkpoint.loader import open_checkpoint
    from .checkpoint.quantized import save_quantized_checkpoint
    from .tokenizer import open_tokenizer

    source = open_checkpoint(model)
    path = save_quantized_checkpoint(source, out, type, group_size)
    open_tokenizer(source).save(path)
    print(f"Wrote {type} checkpoint to {path}")


@_with_options
def perplexity(model: str = "smollm2", file: str = "/usr/share/common-licenses/GPL-3", n_ctx: int = 512,
               **options: Any) -> None:
    """Perplexity of MODEL on a text file (llama.cpp's method: windows of --n_ctx tokens, second halves scored);
    runs under tensor and pipeline parallelism too."""
    from .generation.perplexity import perplexity as run

    text = Path(file).read_text(encoding="utf-8", errors="replace")
    llama = Llama.from_config(*make_configs(model, n_ctx, 1, **options))
    result = run(llama, text, n_ctx=n_ctx)
    if llama.is_driver:
        print(f"Final estimate: PPL = {result['ppl']:.4f} +/- {result['ppl_error']:.5f} "
              f"({result['scored_tokens']} tokens scored in {result['windows']} windows of {n_ctx})")


@_with_options
def bench(config: str = "llama-2-7b", model: str | None = None, batches: tuple = (1, 8, 32), steps: int = 128,
          prefill: int = 512, hf: bool = True, n_ctx: int = 1024, context: int = 16, **options: Any) -> None:
    """Prefill and decode tokens/s beside the bandwidth ceiling and HF transformers (random weights of a
    configs/ shape, or --model); prints JSON on rank 0 (and writes it under --out, a folder, if given).
    --context: the prompt's tokens before the timed decode steps. --quantize defaults to none here."""
    from .bench import bench as run

    run(config, model, tuple(batches), steps, prefill, hf, n_ctx, context=context, **options)


def info(model: str = "smollm2") -> None:
    """Architecture, size, tensor types, tokenizer and the tensor-parallel sizes MODEL allows."""
    from .info import model_info

    print(json.dumps(model_info(model), indent=2))


@_with_options
def serve(model: str = "smollm2", host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8, n_ctx: int = 2048,
          max_queue: int = 64, api_key: str | None = None, slots: bool = True, context_shift: bool = False,
          alias: str | None = None, n_predict: int = -1, seed: int | None = None, temperature: float | None = None,
          prefill_chunk: int = 256, tags: str | None = None, cors_origins: str = "*", ui: bool = True,
          overlap: bool | None = None, **options: Any) -> None:
    """HTTP server: llama.cpp's endpoints (/completion, /tokenize, /props, /slots, /metrics, ...) and OpenAI's
    (/v1/completions, /v1/chat/completions, /v1/models, also without /v1), continuous batching across ranks
    (--max_batch sequences of --n_ctx tokens each, --max_queue waiting). One model is served, so any model name
    a client sends is accepted and echoed back. --noslots: GET /slots answers 501. --context_shift (llama.cpp's
    --context-shift): a prompt longer than the context keeps its first n_keep tokens and loses whole blocks after
    them, and a full context drops half of what follows them and goes on. --alias: the model's name in answers
    and /v1/models (several, comma-separated: the first in sorted order is its id, all are listed; --tags too).
    --host: one address or several, comma-separated (e.g. 127.0.0.1,::1). --n_predict: tokens an answer may have when
    its request does not say (-1: until the context is full; OpenAI completions default to 16). --seed: the sampling
    seed of requests that give none (default: a fresh one each); --temperature: theirs when they give none (default: the
    API's, 0.8 llama.cpp, 1.0 OpenAI). --prefill_chunk: tokens a step reads while answers stream, prompt tokens and
    answers' rows together (longer prompts take several steps, so running answers keep flowing while they are read). A
    new prompt starts from the longest prefix of it already cached, whose KV cache blocks requests share (a request's
    "cache_prompt": false reads it whole). --kv_tokens: tokens the KV cache holds for all sequences together (default
    max_batch x n_ctx); with fewer, sequences take blocks as they grow, and where none is free the latest admitted waits
    to be read again (preempted, never failed). Browser pages on other origins may call it (CORS): --cors_origins "*"
    (any), "localhost" (pages on this machine) or a comma-separated list. --noui: no chat page
    at /. The API key may come as Authorization: Bearer <key> or x-api-key: <key>. On GPUs the decode step's
    CUDA graphs (and the prompt pass's) are captured before /health answers 200, so no request waits for one
    (with --compile, steps are compiled on first use instead). --overlap: each step is launched before the host
    reads the tokens the step before chose, which the device feeds to it (default: on GPUs; one pipeline stage
    only; requests with a grammar, a repeat penalty or log-probabilities are read at once)."""
    from .serving.server import serve as run

    run(*make_configs(model, n_ctx, max_batch, **options), _listed(host), port, max_queue, api_key, slots,
        context_shift, _listed(alias), n_predict, seed, temperature, prefill_chunk, _listed(tags),
        _listed(cors_origins), ui, overlap)


COMMANDS = {"generate": generate, "chat": chat, "convert": convert, "quantize": quantize,
            "perplexity": perplexity, "bench": bench, "serve": serve, "info": info}


def main() -> None:
    # Commands that take shared options as keywords would swallow --help as one; Fire shows help after "--".
    argv = sys.argv[1:]
    if "--help" in argv:  # (not -h: Fire gives -h to a flag such as serve's --host)
        argv = [a for a in argv if a != "--help"] + ["--", "--help"]
    fire.Fire(COMMANDS, command=argv)


if __name__ == "__main__":
    main()
