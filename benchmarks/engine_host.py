"""The serving engine's own host time per step, without HTTP: what a GPU server spends in Python between the
GPU's passes (planning, choosing and detokenizing each request's token, its events).

    python benchmarks/engine_host.py [--model smollm2 --clients 32 --requests 96 --tokens 64]
    python benchmarks/engine_host.py --model /tmp/serve-7b --tokenizer T.gguf      # GPU: serve_gpu.py's files

Drives the Engine in-process with greedy requests (ignore_eos, ~40-token prompts, `clients` at a time), and
subtracts the time spent inside the runner's passes (the model's arithmetic, here on the CPU) from the
engine loop's wall time (on GPUs each pass is synchronised, so its GPU time counts as the pass's). Prints host
ms per pass and us per generated token, and tokens/s. With --timed False the passes are not timed (nor
synchronised), so on GPUs the engine runs ahead of the host as the server does: tokens/s without HTTP.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist import Llama  # noqa: E402
from llama_dist.generation.sampling import SamplingParams  # noqa: E402
from llama_dist.serving.engine import Engine, Request  # noqa: E402
from serve_gpu import prompt  # noqa: E402  (this folder is the script's: on sys.path)


def main(model: str = "smollm2", tokenizer: str | None = None, clients: int = 32, requests: int = 96,
         tokens: int = 64, words: int = 40, max_seq_len: int = 512, timed: bool = True) -> None:
    """model and tokenizer as `serve` takes them (a GPU: serve_gpu.py's checkpoint and tokenizer file)."""
    llama = Llama.build(model, tokenizer, max_seq_len=max_seq_len, max_batch_size=clients)
    engine = Engine(llama, max_batch=clients, max_queue=requests)
    runner, inside = engine.runner, [0.0, 0]

    def timed_pass(method):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                out = method(*args, **kwargs)
                if llama.ctx.device.type == "cuda":  # the pass's GPU time counts as the pass's, not the host's
                    torch.cuda.synchronize()
                return out
            finally:
                inside[0] += time.perf_counter() - start
                inside[1] += 1
        return run

    if timed:
        runner.prefill, runner.decode = timed_pass(runner.prefill), timed_pass(runner.decode)
    prompts = [llama.tokenizer.encode(prompt(i, words), bos=True, eos=False) for i in range(requests)]
    finished, generated = threading.Semaphore(0), [0]

    def on_event(event: dict) -> None:
        if event["type"] == "token":
            generated[0] += len(event["tokens"])
        elif event["type"] in ("done", "error"):
            finished.release()

    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    start = time.perf_counter()
    for ids in prompts:
        while True:  # keep `clients` requests in the engine, as that many clients would
            if engine.waiting.qsize() + len(engine.running) < clients:
                break
            time.sleep(0.0005)
        engine.submit(Request(ids, SamplingParams(temperature=0.0), tokens, on_event=on_event, ignore_eos=True))
    for _ in prompts:
        finished.acquire()
    wall = time.perf_counter() - start
    engine.stopping.set()
    loop.join(timeout=60)
    result = {"model": model, "clients": clients, "requests": requests, "tokens": tokens, "timed": timed,
              "generated": generated[0], "wall_s": round(wall, 3), "tok_s": round(generated[0] / wall, 1)}
    if timed:
        host = wall - inside[0]
        result.update(passes=inside[1], runner_s=round(inside[0], 3), host_ms_per_pass=round(1e3 * host / inside[1], 3),
                      host_us_per_token=round(1e6 * host / max(generated[0], 1), 1))
    print(json.dumps(result))


if __name__ == "__main__":
    fire.Fire(main)
