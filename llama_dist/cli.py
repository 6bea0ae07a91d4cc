"""`llama-dist` command line: the same SPMD program under python, torchrun, mpirun or srun."""
from __future__ import annotations

from pathlib import Path

import fire

from .generation.llama import Llama


def _default_tokenizer(model: str) -> str:
    """Meta ships tokenizer.model inside the model folder or beside it."""
    for candidate in (Path(model) / "tokenizer.model", Path(model).parent / "tokenizer.model"):
        if candidate.is_file():
            return str(candidate)
    return str(Path(model) / "tokenizer.model")


def generate(model: str, prompt: str | list[str] = "I believe the meaning of life is", tokenizer: str | None = None,
             max_gen_len: int = 64, temperature: float = 0.6, top_p: float = 0.9, max_seq_len: int = 512,
             backend: str = "auto", dtype: str | None = None, seed: int = 1) -> None:
    """Complete one or more prompts (--prompt may be repeated as a list) and print the results on rank 0."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    llama = Llama.build(model, tokenizer or _default_tokenizer(model), max_seq_len=max_seq_len,
                        max_batch_size=len(prompts), backend=backend, dtype=dtype, seed=seed)
    results = llama.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    if llama.is_driver:
        for p, r in zip(prompts, results):
            print(p + r["generation"])


def main() -> None:
    fire.Fire({"generate": generate})


if __name__ == "__main__":
    main()
