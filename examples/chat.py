"""Meta's example_chat_completion.py flow, on any backend and any supported model file.

    python examples/chat.py --ckpt_dir smollm2
    torchrun --nproc_per_node 2 examples/chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
"""
from __future__ import annotations

import fire

from llama_dist import Llama

DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Always answer with a single short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "The Eiffel Tower, the Louvre and Notre-Dame are the classics."},
        {"role": "user", "content": "What is so great about the first one?"},
    ],
]


def main(ckpt_dir: str = "smollm2", tokenizer_path: str | None = None, temperature: float = 0.0, top_p: float = 0.9,
         max_seq_len: int = 1024, max_gen_len: int | None = 128, max_batch_size: int = 4, backend: str = "auto"):
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                            backend=backend)
    results = generator.chat_completion(DIALOGS, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    if generator.is_driver:
        for dialog, result in zip(DIALOGS, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
