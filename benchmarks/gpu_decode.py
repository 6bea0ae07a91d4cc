"""GPU decode speed (the `llama-dist bench` command as a script).

    python benchmarks/gpu_decode.py --config llama-2-7b                      # one GPU, + HF eager figures
    torchrun --nproc_per_node 2 benchmarks/gpu_decode.py --config llama-2-7b --hf False
"""
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist.bench import bench  # noqa: E402


def main(**kwargs) -> None:
    bench(**kwargs)  # prints its JSON on rank 0 (fire would print the returned dict on every rank)


if __name__ == "__main__":
    fire.Fire(main)
