"""Core-engine figures on CPU: decode tokens/s at 1 and 2 Gloo ranks beside HF transformers, and checkpoint load time.

    python benchmarks/cpu_core.py [--config configs/small-bench.json] [--tokens 64] [--load-gb 1]

Random weights (speed does not depend on values). Absolute CPU times on a shared machine are noise;
read the ratios from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_dist.checkpoint.meta import save_meta_checkpoint  # noqa: E402
from llama_dist.checkpoint.source import StateDictSource  # noqa: E402
from llama_dist.model.args import ModelArgs  # noqa: E402
from tests.helpers import free_port, random_state_dict  # noqa: E402


def decode_worker(ckpt: str, tokens: int) -> None:
    """One rank: greedy-decode `tokens` tokens at batch 1; rank 0 prints tok/s."""
    from llama_dist.bench import decode_tok_s
    from llama_dist.checkpoint.config import LoadConfig
    from llama_dist.checkpoint.loader import open_checkpoint
    from llama_dist.distributed.context import init_distributed
    from llama_dist.generation.llama import load_runner

    ctx = init_distributed("gloo")
    runner = load_runner(open_checkpoint(ckpt), ctx, LoadConfig(dtype="float32", n_ctx=256, max_batch_size=1),
                         progress=False)
    tok_s = decode_tok_s(runner, ctx, batch=1, steps=tokens)
    if ctx.is_driver:
        print(json.dumps({"tok_s": tok_s}))


def launch(world: int, ckpt: Path, tokens: int) -> float:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(ckpt), "--tokens", str(tokens)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate()[0] for p in procs]
    return json.loads(outs[0].strip().splitlines()[-1])["tok_s"]


def hf_decode(args: ModelArgs, sd: dict, tokens: int) -> float:
    import transformers

    from llama_dist.checkpoint.hf_names import hf_name, interleaved_to_hf, rotary_permuted

    config = transformers.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim,
                                      intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                                      num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                                      rms_norm_eps=args.norm_eps, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict({hf_name(k): interleaved_to_hf(v, args.head_dim) if rotary_permuted(k) else v
                           for k, v in sd.items()}, strict=False)
    prompt = torch.arange(16).view(1, -1)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - start)


def load_figures(gb: float) -> dict:
    """A random fp32 Meta checkpoint of about `gb` GB: our load time beside plain file-read time."""
    from llama_dist.checkpoint.config import LoadConfig
    from llama_dist.checkpoint.loader import load_model, open_checkpoint
    from llama_dist.distributed.context import init_distributed

    layers = max(1, int(gb * 16))
    args = ModelArgs(dim=1024, n_layers=layers, n_heads=16, vocab_size=32000, multiple_of=256)
    with tempfile.TemporaryDirectory() as d:
        save_meta_checkpoint(StateDictSource(args, random_state_dict(args)), d)
        files = list(Path(d).glob("*.pth"))
        size = sum(f.stat().st_size for f in files)
        start = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        model = load_model(open_checkpoint(d), init_distributed(),
                           LoadConfig(dtype="float32", n_ctx=16, max_batch_size=1), progress=False)
        # Touch every weight so lazily mapped pages count as loaded.
        checksum = sum(float(p.float().sum()) for p in model.parameters())
        load_s = time.perf_counter() - start
    return {"checkpoint_gb": size / 1e9, "read_files_s": read_s, "llama_dist_load_s": load_s, "checksum": checksum}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "small-bench.json"))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--load-gb", type=float, default=1.0)
    p.add_argument("--worker")
    a = p.parse_args()
    if a.worker:
        return decode_worker(a.worker, a.tokens)
    args = ModelArgs.from_params_json(a.config)
    sd = random_state_dict(args)
    with tempfile.TemporaryDirectory() as d:
        save_meta_checkpoint(StateDictSource(args, sd), d)
        ours = {w: launch(w, Path(d), a.tokens) for w in (1, 2)}
    threads = torch.get_num_threads()
    hf = hf_decode(args, sd, a.tokens)
    print(f"shape {Path(a.config).name}: dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}; "
          f"batch 1, {a.tokens} greedy tokens, fp32, {os.cpu_count()} cores")
    print(f"  HF transformers eager ({threads} threads): {hf:8.1f} tok/s")
    for w, v in ours.items():
        print(f"  llama-dist, {w} rank(s) (Gloo):        {v:8.1f} tok/s   ({v / hf:.2f}x HF)")
    lf = load_figures(a.load_gb)
    print(f"load: {lf['checkpoint_gb']:.2f} GB fp32 Meta checkpoint: reading the files {lf['read_files_s']:.2f} s, "
          f"llama-dist load {lf['llama_dist_load_s']:.2f} s ({lf['read_files_s'] / lf['llama_dist_load_s']:.2f}x "
          "of file-read speed)")


if __name__ == "__main__":
    main()
