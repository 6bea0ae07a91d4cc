"""`llama-dist` command line: the same SPMD program under python, torchrun, mpirun or srun.

MODEL is a Meta folder, a Hugging Face folder, a .gguf file, or `smollm2` (the bundled GGUF).
"""
from __future__ import annotations

import json

import fire

from .generation.llama import Llama


def _prompts(prompt: str | list[str] | tuple[str, ...]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]


def generate(model: str = "smollm2", prompt: str | list[str] = "I believe the meaning of life is",
             tokenizer: str | None = None, max_gen_len: int = 64, temperature: float = 0.6, top_p: float = 0.9,
             max_seq_len: int = 512, backend: str = "auto", dtype: str | None = None, seed: int = 1) -> None:
    """Complete each prompt (--prompt may be a list) and print prompt + completion on rank 0."""
    prompts = _prompts(prompt)
    llama = Llama.build(model, tokenizer, max_seq_len=max_seq_len, max_batch_size=len(prompts), backend=backend,
                        dtype=dtype, seed=seed)
    results = llama.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    if llama.is_driver:
        for p, r in zip(prompts, results):
            print(p + r["generation"])


def chat(prompt: str | list[str], model: str = "smollm2", system: str | None = None, tokenizer: str | None = None,
         max_gen_len: int = 256, temperature: float = 0.0, top_p: float = 0.9, max_seq_len: int = 2048,
         backend: str = "auto", dtype: str | None = None, chat_template: str | None = None, seed: int = 1) -> None:
    """Answer each --prompt as a one-turn chat, in the model's own chat format."""
    prompts = _prompts(prompt)
    llama = Llama.build(model, tokenizer, max_seq_len=max_seq_len, max_batch_size=len(prompts), backend=backend,
                        dtype=dtype, seed=seed)
    head = [{"role": "system", "content": system}] if system else []
    dialogs = [head + [{"role": "user", "content": p}] for p in prompts]
    results = llama.chat_completion(dialogs, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len,
                                    chat_template=chat_template)
    if llama.is_driver:
        for p, r in zip(prompts, results):
            print(f"> {p}\n{r['generation']['content']}\n")


def convert(model: str, out: str, to: str = "meta", mp: int = 1, dtype: str = "float32") -> None:
    """Write MODEL as a Meta checkpoint with --mp shards (--to meta) or as HF safetensors (--to hf)."""
    from .convert import convert as run

    path = run(model, out, to=to, mp=mp, dtype=dtype)
    print(f"Wrote {to} checkpoint to {path}")


def info(model: str = "smollm2") -> None:
    """Architecture, size, tensor types, tokenizer and the tensor-parallel sizes MODEL allows."""
    from .info import model_info

    print(json.dumps(model_info(model), indent=2))


def main() -> None:
    fire.Fire({"generate": generate, "chat": chat, "convert": convert, "info": info})


if __name__ == "__main__":
    main()
