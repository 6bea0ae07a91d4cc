"""Shared test machinery: tiny random models, checkpoints written on the fly, and real multi-process launches."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from llama_dist.checkpoint.meta import save_meta_checkpoint
from llama_dist.checkpoint.shard import full_shape, param_names
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.generation.sampling import SamplingParams
from llama_dist.model.args import ModelArgs
from llama_dist.serving.engine import Engine, Request
from llama_dist.serving.interactive import run_requests

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"

TINY_MHA = dict(dim=64, n_layers=2, n_heads=4, vocab_size=384, multiple_of=32)
TINY_GQA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, multiple_of=32, rope_theta=500000.0)

# the decode attention compiled for sm_90 in tests (benchmarks/kernel_ptx.compile_for): its constexprs but SPLIT
# (a 7B-like head, GQA groups of 4, a row's positions shared over its programs) and its pointers' types
ATTENTION_CONSTANTS = {"N_REP": 4, "HEAD_DIM": 128, "KV_BLOCK": 16, "BLOCK_R": 16, "BLOCK_L": 32, "PART_L": 512,
                       "EVEN": True, "WHOLE": False, "MERGE_R": 4, "MERGE_P": 8}
ATTENTION_POINTERS = {"qkv_ptr": "*bf16", "rope_ptr": "*fp32", "cache_k_ptr": "*bf16", "cache_v_ptr": "*bf16",
                      "table_ptr": "*i32", "slot_ptr": "*i32", "pos_ptr": "*i32", "o_ptr": "*bf16",
                      "parts_ptr": "*fp32", "tickets_ptr": "*i32"}


def random_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights scaled like a trained model's (unit-variance activations), so logits are far from ties."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in param_names(args):
        shape = full_shape(name, args)
        if len(shape) == 1:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            scale = 1.0 if name == "tok_embeddings.weight" else shape[1] ** -0.5
            sd[name] = scale * torch.randn(shape, generator=g)
    return sd


def paged(dense: torch.Tensor, block: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache of rows [rows, kv heads, L, head_dim] paged as the model pages it: blocks of `block` positions in
    a shuffled order, one spare block among them, and the block table [rows, blocks per row] that finds them."""
    rows, n_kv, length, d = dense.shape
    per_row = -(-length // block)
    padded = torch.nn.functional.pad(dense, (0, 0, 0, per_row * block - length))
    blocks = padded.view(rows, n_kv, per_row, block, d).transpose(1, 2).reshape(rows * per_row, n_kv, block, d)
    order = torch.randperm(rows * per_row + 1, generator=generator)[:rows * per_row]
    cache = torch.randn(rows * per_row + 1, n_kv, block, d, generator=generator).to(dense.dtype)
    cache[order] = blocks
    return cache, order.view(rows, per_row)


def unpaged(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """paged's inverse: the rows [rows, kv heads, length, head_dim]."""
    return cache[table].transpose(1, 2).flatten(2, 3)[:, :, :length]


def engine_answers(engine: Engine, prompts: list[list[int]], lengths: list[int], cache_prompt: bool = True,
                   options: list[dict] | None = None) -> tuple[list[list[int]], list[dict]]:
    """Greedy answers of a serving engine to prompts submitted together (continuous batching), and each one's
    "done" event. options: more Request fields per prompt (sampling params, stop words, ...). The engine runs
    until they are answered (and may run again)."""
    requests = [Request(ids, max_new_tokens=n, on_event=lambda e: None,
                        **{"params": SamplingParams(temperature=0.0), "cache_prompt": cache_prompt,
                           **(options[i] if options else {})})
                for i, (ids, n) in enumerate(zip(prompts, lengths))]
    events = run_requests(engine, requests)
    finals = [e[-1] for e in events]
    assert all(f["type"] == "done" for f in finals), finals
    return [[t for e in request if e["type"] == "token" for t in e["tokens"]] for request in events], finals


def write_meta_checkpoint(path: Path, args: ModelArgs, state_dict: dict[str, torch.Tensor], mp: int = 1) -> Path:
    return save_meta_checkpoint(StateDictSource(args, state_dict), path, mp=mp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world_size: int, argv: list[str], extra_env: dict[str, str] | None = None,
                ranks: list[int] | None = None) -> list[subprocess.Popen]:
    """Start real processes (all ranks, or only `ranks`) with the environment torchrun gives its workers."""
    port = free_port()
    procs = []
    for rank in range(world_size) if ranks is None else ranks:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def launch_ranks(world_size: int, argv: list[str], timeout: float = 240, extra_env: dict[str, str] | None = None,
                 ranks: list[int] | None = None) -> list[subprocess.CompletedProcess]:
    """start_ranks, then wait for all of them (killing any left after `timeout`)."""
    procs = start_ranks(world_size, argv, extra_env, ranks)
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return results


async def streamed_tokens(http, url: str, body: dict, leave_after_first: bool = False) -> list[int] | None:
    """A streamed /completion's tokens up to its final event (http: an httpx.AsyncClient), or None for a client
    that leaves after its first token event. A status other than 200, or a stream that ends without its final
    event, raises."""
    tokens = []
    async with http.stream("POST", f"{url}/completion", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.status_code
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["stop"]:
                    return tokens
                tokens += event["tokens"]
                if leave_after_first:
                    return None
    raise AssertionError(f"the stream of {body['prompt']!r} ended without a final event")


def check_all_ok(results: list[subprocess.CompletedProcess]) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"


TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
I believe the meaning of life is to find your gift and give it away. Simply put, the theory of relativity
states that the laws of physics are the same for all observers. Hi everyone, I just wanted to say congratulations
on the launch. Translate English to French: sea otter => loutre de mer, peppermint => menthe poivree,
plush girafe => girafe peluche, cheese => fromage. Numbers like 1, 2, 3, 42 and 1000 appear in text too.
def main(): return sum(x * x for x in range(10))  # code appears as well
Tensor parallelism splits each layer across ranks; every rank holds a slice of every weight matrix.
"""


def train_sentencepiece(out_dir: Path, vocab_size: int = 384) -> Path:
    import sentencepiece as spm

    corpus = out_dir / "corpus.txt"
    corpus.write_text(TRAINING_TEXT * 20)
    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama's
    return prefix.with_suffix(".model")
