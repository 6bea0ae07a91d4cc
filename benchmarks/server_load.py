"""Server throughput and latency on loopback: llama-dist serve vs llama-cpp-python's server, same GGUF, same run.

    pip install 'llama-cpp-python[server]==0.3.36'   # not a CI dependency
    python benchmarks/server_load.py [--requests 16] [--tokens 32] [--engines "llama.cpp,llama-dist"]

For concurrency 1, 4 and 16: requests/s, generated tokens/s, p50/p99 request latency. Each engine gets
the same prompts (greedy, fixed n_predict) through the same OpenAI-style /v1/completions endpoint; ours runs
eager and with --compile (a warm-up at each concurrency compiles its batch sizes before timing).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_dist.checkpoint.bundled import bundled_model_path  # noqa: E402
from tests.helpers import free_port  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The quick brown fox",
           "Water boils at", "In 1492, Columbus", "My favourite colour is", "The largest planet is"]


def start(engine: str, port: int, threads: int, slots: int) -> subprocess.Popen:
    model = str(bundled_model_path())
    if engine == "llama.cpp":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port), "--n_threads",
               str(threads), "--n_ctx", "2048", "--model_alias", "smollm2"]
    else:
        cmd = [sys.executable, "-m", "llama_dist.cli", "serve", "--model", "smollm2", "--port", str(port),
               "--max_batch", str(slots), "--n_ctx", "512", "--compile", str(engine.endswith("--compile"))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    ready = "/v1/models" if engine == "llama.cpp" else "/health"  # ours answers /v1/models while loading
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{engine} server did not start")


def one(port: int, prompt: str, tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=600,
                   json={"model": "smollm2", "prompt": prompt, "max_tokens": tokens, "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


def load(port: int, concurrency: int, requests: int, tokens: int) -> dict:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:  # warm-up (compiles the batch sizes used)
        list(pool.map(lambda i: one(port, PROMPTS[i % len(PROMPTS)], 4), range(concurrency)))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one(port, PROMPTS[i % len(PROMPTS)], tokens), range(requests)))
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    return {"req_s": requests / wall, "tok_s": sum(r[1] for r in results) / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="llama.cpp,llama-dist,llama-dist --compile",
                   help="comma-separated, of: llama.cpp, llama-dist, llama-dist --compile")
    a = p.parse_args()
    rows = []
    for engine in a.engines.split(","):
        port = free_port()
        proc = start(engine, port, a.threads, 16)
        try:
            for c in (1, 4, 16):
                rows.append((engine, c, load(port, c, a.requests, a.tokens)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{a.requests} requests x {a.tokens} greedy tokens per concurrency level, SmolLM2 Q4_1, "
          f"{a.threads} threads, loopback")
    print("| engine | concurrency | req/s | gen tok/s | p50 s | p99 s |\n|---|---|---|---|---|---|")
    for engine, c, r in rows:
        print(f"| {engine} | {c} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} |")
    print(json.dumps([{"engine": e, "concurrency": c, **r} for e, c, r in rows]))


if __name__ == "__main__":
    main()
