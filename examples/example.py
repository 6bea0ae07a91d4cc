"""Meta's example_text_completion.py flow, unchanged in interface, on any backend.

    python examples/example.py --ckpt_dir DIR --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 examples/example.py --ckpt_dir DIR --tokenizer_path tokenizer.model
"""
from __future__ import annotations

import fire

from llama_dist import Llama

PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


def main(ckpt_dir: str, tokenizer_path: str, temperature: float = 0.6, top_p: float = 0.9,
         max_seq_len: int = 128, max_gen_len: int = 64, max_batch_size: int = 4, backend: str = "auto",
         dtype: str | None = None, seed: int = 1, pp: int = 1, pp_split: str | None = None, compile: bool = False):
    """--pp N splits the layers into N pipeline stages (ranks = tensor-parallel size x N); --compile compiles
    the one-token decode step (CUDA graphs on GPUs; the first steps pay for compilation)."""
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, backend=backend, dtype=dtype, seed=seed, pp=pp,
                            pp_split=pp_split, compile=compile)
    results = generator.text_completion(PROMPTS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if generator.is_driver:
        for prompt, result in zip(PROMPTS, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
