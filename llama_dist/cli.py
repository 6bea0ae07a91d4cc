"""`llama-dist` command line: the same SPMD program under python, torchrun, mpirun or srun.

MODEL is a Meta folder, a Hugging Face folder, a .gguf file, or `smollm2` (the bundled GGUF).
"""
from __future__ import annotations

import json
from pathlib import Path

import fire

from .generation.llama import Llama


def _prompts(prompt: str | list[str] | tuple[str, ...]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]


def generate(model: str = "smollm2", prompt: str | list[str] = "I believe the meaning of life is",
             tokenizer: str | None = None, max_gen_len: int = 64, temperature: float = 0.6, top_p: float = 0.9,
             max_seq_len: int = 512, backend: str = "auto", dtype: str | None = None, seed: int = 1,
             quantize: str = "auto", pp: int = 1, pp_split: str | None = None, compile: bool = False) -> None:
    """Complete each prompt (--prompt may be a list) and print prompt + completion on rank 0.
    --pp N: N pipeline stages (ranks = TP x N), --pp_split 10,20: layers per stage.
    --compile: compile the one-token decode step (inductor on CPU, CUDA graphs on GPUs); the first steps
    pay for compilation (about a minute for SmolLM2 on 2 cores, seconds once inductor's disk cache is warm)."""
    prompts = _prompts(prompt)
    llama = Llama.build(model, tokenizer, max_seq_len=max_seq_len, max_batch_size=len(prompts), backend=backend,
                        dtype=dtype, seed=seed, quantize=quantize, pp=pp, pp_split=pp_split, compile=compile)
    results = llama.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    if llama.is_driver:
        for p, r in zip(prompts, results):
            print(p + r["generation"])


def chat(prompt: str | list[str] | None = None, model: str = "smollm2", system: str | None = None,
         tokenizer: str | None = None, max_gen_len: int = 256, temperature: float | None = None, top_p: float = 0.9,
         max_seq_len: int = 2048, backend: str = "auto", dtype: str | None = None, chat_template: str | None = None,
         seed: int = 1, quantize: str = "auto", raw: bool = False, pp: int = 1, pp_split: str | None = None,
         compile: bool = False) -> None:
    """Without --prompt: an interactive chat (--raw: Meta's "Enter prompt:" completion loop).
    With --prompt: answer each as a one-turn chat, in the model's own chat format, and exit.
    --temperature defaults to 0.7 interactively and 0 (greedy) for --prompt. --compile: as for generate."""
    if prompt is None:
        from .serving.interactive import interactive

        return interactive(model, system, raw, tokenizer, max_gen_len, max_seq_len,
                           0.7 if temperature is None else temperature, top_p, backend, dtype, quantize, pp, pp_split,
                           compile)
    prompts = _prompts(prompt)
    llama = Llama.build(model, tokenizer, max_seq_len=max_seq_len, max_batch_size=len(prompts), backend=backend,
                        dtype=dtype, seed=seed, quantize=quantize, pp=pp, pp_split=pp_split, compile=compile)
    head = [{"role": "system", "content": system}] if system else []
    dialogs = [head + [{"role": "user", "content": p}] for p in prompts]
    results = llama.chat_completion(dialogs, temperature=temperature or 0.0, top_p=top_p, max_gen_len=max_gen_len,
                                    chat_template=chat_template)
    if llama.is_driver:
        for p, r in zip(prompts, results):
            print(f"> {p}\n{r['generation']['content']}\n")


def convert(model: str, out: str, to: str = "meta", mp: int = 1, dtype: str = "float32") -> None:
    """Write MODEL as a Meta checkpoint with --mp shards (--to meta) or as HF safetensors (--to hf)."""
    from .convert import convert as run

    path = run(model, out, to=to, mp=mp, dtype=dtype)
    print(f"Wrote {to} checkpoint to {path}")


def quantize(model: str, out: str, type: str = "int8", group_size: int = 32) -> None:
    """Write MODEL with int8 (per channel) or int4 (--group-size) linear weights; it loads at any TP size."""
    from .checkpoint.loader import open_checkpoint, open_tokenizer
    from .checkpoint.quantized import save_quantized_checkpoint

    source = open_checkpoint(model)
    path = save_quantized_checkpoint(source, out, type, group_size)
    open_tokenizer(source).save(path)
    print(f"Wrote {type} checkpoint to {path}")


def perplexity(model: str = "smollm2", file: str = "/usr/share/common-licenses/GPL-3", ctx: int = 512,
               tokenizer: str | None = None, backend: str = "auto", dtype: str | None = None,
               quantize: str = "auto", group_size: int = 32, pp: int = 1, pp_split: str | None = None) -> None:
    """Perplexity of MODEL on a text file (llama.cpp's method); runs under tensor and pipeline parallelism too."""
    from .generation.perplexity import perplexity as run

    text = Path(file).read_text(encoding="utf-8", errors="replace")
    llama = Llama.build(model, tokenizer, max_seq_len=ctx, max_batch_size=1, backend=backend, dtype=dtype,
                        quantize=quantize, group_size=group_size, pp=pp, pp_split=pp_split)
    result = run(llama, text, ctx=ctx)
    if llama.is_driver:
        print(f"Final estimate: PPL = {result['ppl']:.4f} +/- {result['ppl_error']:.5f} "
              f"({result['scored_tokens']} tokens scored in {result['windows']} windows of {ctx})")


def bench(config: str = "llama-2-7b", model: str | None = None, batches: tuple = (1, 8, 32), steps: int = 128,
          prefill: int = 512, compile: bool = True, hf: bool = True, quantize: str = "none",
          backend: str = "auto", pp: int = 1) -> None:
    """Prefill and decode tokens/s beside the bandwidth ceiling and HF transformers (random weights of a
    configs/ shape, or --model); prints JSON on rank 0."""
    from .bench import bench as run

    run(config, model, tuple(batches), steps, prefill, compile, hf, quantize, backend, pp=pp)


def info(model: str = "smollm2") -> None:
    """Architecture, size, tensor types, tokenizer and the tensor-parallel sizes MODEL allows."""
    from .info import model_info

    print(json.dumps(model_info(model), indent=2))


def serve(model: str = "smollm2", host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8, ctx: int = 2048,
          max_queue: int = 64, api_key: str | None = None, backend: str = "auto", dtype: str | None = None,
          quantize: str = "auto", tokenizer: str | None = None, pp: int = 1, pp_split: str | None = None,
          compile: bool = False) -> None:
    """HTTP server: llama.cpp's /completion and OpenAI's /v1 API, continuous batching across ranks.
    --compile: compiled decode steps, built on first use (GPUs: a CUDA graph per power-of-two batch size and
    cache window)."""
    from .serving.server import serve as run

    run(model, host, port, max_batch, ctx, max_queue, api_key, backend, dtype, quantize, tokenizer, pp, pp_split,
        compile)


def main() -> None:
    fire.Fire({"generate": generate, "chat": chat, "convert": convert, "quantize": quantize,
               "perplexity": perplexity, "bench": bench, "serve": serve, "info": info})


if __name__ == "__main__":
    main()
