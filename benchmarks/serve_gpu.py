"""The server against the engine on one GPU: `llama-dist serve` driven by concurrent streaming clients, beside
`bench`'s decode figures for the same checkpoint from the same run.

    python benchmarks/serve_gpu.py tokenizer OUT.gguf               # here: the bundled tokenizer, alone (~3 MB)
    python benchmarks/serve_gpu.py run --tokenizer OUT.gguf [--out DIR]   # on the GPU machine

`run` writes a Llama-2-7B-shaped Meta checkpoint of random bf16 weights (vocabulary 49152, so SmolLM2's
tokenizer fits it) unless one is there, starts the server, and reports: seconds to ready (load + capturing
the CUDA graphs); for concurrency 1/8/32/128, generated tokens/s (over the level and its second half), time to
first token p50/p99, inter-token p50/p99/max, and the server's engine steps in the level (/metrics: their count,
mean time, decode rows and how many read prompts) (each client streams /completion, greedy, ignore_eos, distinct
prompts, no prefix reuse);
the time to first token of a second request sharing a ~1k-token prefix, against the first; inter-token
times of running streams while long prompts arrive; 256 streaming clients, a tenth leaving mid-stream, and how
many of the rest got their prompt's answer alone; then `bench` batch 1 and 32 on the same checkpoint. A level's
clock starts when all its clients are ready (connections open), so it measures the server, not their start.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import multiprocessing.synchronize
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import free_port, streamed_tokens  # noqa: E402

WORDS = ("river stone light garden market winter paper engine silver forest quiet number window music yellow "
         "harbor planet letter bridge candle").split()


def tokenizer(out: str) -> None:
    """The bundled model's tokenizer alone, as a GGUF file without tensors (what `--tokenizer` reads)."""
    import gguf

    from llama_dist.checkpoint.bundled import bundled_model_path

    reader = gguf.GGUFReader(str(bundled_model_path()))
    writer = gguf.GGUFWriter(out, "llama")
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            value = f.contents()
            kind = f.types[0]
            sub = f.types[1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, kind, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def write_checkpoint(path: Path) -> float:
    import torch

    from llama_dist.checkpoint.meta import save_meta_checkpoint
    from llama_dist.checkpoint.source import RandomSource
    from llama_dist.model.args import ModelArgs

    start = time.perf_counter()
    args = ModelArgs.from_params_json(ROOT / "configs" / "llama-2-7b.json")
    args.vocab_size = 49152
    save_meta_checkpoint(RandomSource(args, torch.device("cuda")), path)
    torch.cuda.empty_cache()
    return time.perf_counter() - start


def prompt(i: int, words: int) -> str:
    """A prompt of about `words` tokens, different from every other i from its first words."""
    return " ".join(WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(words)) + f" {i}"


def limits(connections: int) -> httpx.Limits:
    """A client's connections, idle ones dropped after 1 s: uvicorn closes them after 5 s (httpx's own default
    too), and a request sent on one the server is closing fails with a read error."""
    return httpx.Limits(max_connections=connections, keepalive_expiry=1.0)


async def stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed /completion: its token times."""
    start, times = time.perf_counter(), []
    async with client.stream("POST", f"{url}/completion", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                times += [time.perf_counter()] * max(1, len(event.get("tokens") or [])) if not event["stop"] else []
    return {"start": start, "times": times}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary(results: list[dict], elapsed: float) -> dict:
    """tok_s over the level; tok_s_last_half over its second half alone (a one-off stall early in the level, such
    as first-use work in the server, shows as the two parting)."""
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    end = max(t for r in results for t in r["times"])
    middle = end - elapsed / 2
    return {"tok_s": sum(len(r["times"]) for r in results) / elapsed,
            "tok_s_last_half": sum(t > middle for r in results for t in r["times"]) / (elapsed / 2),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "itl_p50_ms": 1e3 * percentile(gaps, 0.5), "itl_p99_ms": 1e3 * percentile(gaps, 0.99),
            "itl_max_ms": 1e3 * max(gaps, default=float("nan")), "requests": len(results)}


async def level_part(url: str, concurrency: int, prompts: list[int], tokens: int, words: int,
                     temperature: float, start_at: float) -> list[dict]:
    """One client process's share of a level: streams for these prompt numbers, `concurrency` at a time, from
    `start_at` (perf_counter), with the client made and its connections opened before then (a process's first
    client takes tens of ms to make: started unsynchronised, the level's first requests arrived over ~100 ms)."""
    async with httpx.AsyncClient(timeout=600, limits=limits(concurrency + 4)) as client:
        await asyncio.gather(*(client.get(f"{url}/health") for _ in range(concurrency)))
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> dict:
            async with gate:
                return await stream(client, url, {"prompt": prompt(i, words), "n_predict": tokens,
                                                  "temperature": temperature, "ignore_eos": True,
                                                  "cache_prompt": False})

        return list(await asyncio.gather(*(one(i) for i in prompts)))


def run_part(*args) -> list[dict]:
    return asyncio.run(level_part(*args))


_clients: multiprocessing.synchronize.Barrier | None = None  # (in each client process)


def join_clients(barrier: multiprocessing.synchronize.Barrier) -> None:
    global _clients
    _clients = barrier


def meet_clients() -> None:
    """Return once every client process is up and waiting here: a level then starts with all of them (one still
    importing when a level began sent its share ~330 ms late, 24 rows a step meanwhile)."""
    _clients.wait(timeout=300)


STEP_SERIES = {"steps": "llamadist_step_decode_rows_count", "decode_rows": "llamadist_step_decode_rows_sum",
               "steps_without_prompt": 'llamadist_step_prompt_tokens_bucket{le="0.0"}'}


def step_counts(url: str) -> dict[str, float]:
    """The server's engine-step series so far (/metrics)."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    values = dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
    return {key: float(values[name]) for key, name in STEP_SERIES.items()}


def load_level(clients: concurrent.futures.ProcessPoolExecutor, processes: int, url: str, concurrency: int,
               requests: int, tokens: int, words: int, offset: int, temperature: float = 0.0) -> dict:
    """A level's streams, shared out over the client processes (one Python process streaming to 128 clients reads
    their events later than they arrive); times are the machine's monotonic clock, the same in every process.
    Beside the clients' figures, the server's steps in the level: tokens/s is about rows_per_step x 1000 / step_ms,
    so a level below the engine's batch figure shows whether its steps were slower or emptier."""
    before = step_counts(url)
    parts = min(processes, concurrency)
    shares = [concurrency // parts + (p < concurrency % parts) for p in range(parts)]
    start_at = time.perf_counter() + 0.5  # (kept-alive connections close after limits()' 1 s)
    futures = [clients.submit(run_part, url, share, list(range(offset + p, offset + requests, parts)), tokens, words,
                              temperature, start_at) for p, share in enumerate(shares)]
    results = [r for f in futures for r in f.result()]
    elapsed = max(r["times"][-1] for r in results if r["times"]) - min(r["start"] for r in results)
    steps = {key: value - before[key] for key, value in step_counts(url).items()}
    n = max(steps["steps"], 1)
    return {**summary(results, elapsed), "steps": int(steps["steps"]), "step_ms": 1e3 * elapsed / n,
            "rows_per_step": steps["decode_rows"] / n, "steps_with_prompt": int(n - steps["steps_without_prompt"])}


async def shared_prefix(url: str, words: int) -> dict:
    """Time to first token of two requests sharing a long prefix: the second starts from the first's cache. Each
    asks for one token and is timed to its answer (a streamed first token can be held back while its text is an
    incomplete character, which random weights often choose), beside the server's own prompt time."""
    system = prompt(10_000, words)
    async with httpx.AsyncClient(timeout=600, limits=limits(4)) as client:
        out = {}
        for name, tail in (("first", " What is the first word?"), ("second", " What is the last word?")):
            start = time.perf_counter()
            body = (await client.post(f"{url}/completion", json={"prompt": system + tail, "n_predict": 1,
                                                                  "temperature": 0})).json()
            out[f"ttft_{name}_ms"] = 1e3 * (time.perf_counter() - start)
            out[f"prompt_ms_{name}"] = body["timings"]["prompt_ms"]
        out["tokens_cached"], out["prompt_tokens"] = body["tokens_cached"], body["tokens_evaluated"]
        return out


async def nothing_lost(url: str, clients: int = 256, prompts: int = 24, words: int = 30) -> dict:
    """`clients` streaming greedy clients over `prompts` distinct prompts, every tenth leaving after its first
    token: how many of the others got exactly the answer their prompt gets alone (issue 21 asks for all; GPUs
    make no batch-invariance promise, so this counts rather than asserts), and how many streams failed or ended
    without their final event (unfinished)."""
    texts = [prompt(40_000 + i, words) for i in range(prompts)]
    lengths = [8 + i % 9 for i in range(prompts)]
    async with httpx.AsyncClient(timeout=600, limits=limits(clients + 4)) as http:
        alone = []
        for text, n in zip(texts, lengths):
            body = {"prompt": text, "n_predict": n, "temperature": 0, "cache_prompt": False}
            alone.append((await http.post(f"{url}/completion", json=body)).json()["tokens"])

        bodies = [{"prompt": texts[i % prompts], "n_predict": lengths[i % prompts], "temperature": 0}
                  for i in range(clients)]
        answers = await asyncio.gather(*(streamed_tokens(http, url, body, leave_after_first=i % 10 == 0)
                                         for i, body in enumerate(bodies)), return_exceptions=True)
    done = [(i, a) for i, a in enumerate(answers) if isinstance(a, list)]
    return {"clients": clients, "left_mid_stream": sum(a is None for a in answers),
            "unfinished": sum(isinstance(a, BaseException) for a in answers), "completed": len(done),
            "equal_to_alone": sum(a == alone[i % prompts] for i, a in done)}


async def long_prompts_arriving(url: str, streams: int, tokens: int, long_words: int, arrivals: int) -> dict:
    """Inter-token times of running streams while long prompts keep arriving (chunked prefill between steps)."""
    async with httpx.AsyncClient(timeout=600, limits=limits(streams + arrivals + 4)) as client:
        running = [asyncio.create_task(stream(client, url, {"prompt": prompt(20_000 + i, 16), "n_predict": tokens,
                                                            "temperature": 0, "ignore_eos": True}))
                   for i in range(streams)]
        await asyncio.sleep(1.0)
        longs = []
        for i in range(arrivals):
            longs.append(asyncio.create_task(stream(client, url, {"prompt": prompt(30_000 + i, long_words),
                                                                  "n_predict": 1, "cache_prompt": False})))
            await asyncio.sleep(0.25)
        results = await asyncio.gather(*running)
        await asyncio.gather(*longs)
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"itl_p50_ms": 1e3 * percentile(gaps, 0.5), "itl_p99_ms": 1e3 * percentile(gaps, 0.99),
            "itl_max_ms": 1e3 * max(gaps), "long_prompt_words": long_words, "arrivals": arrivals}


def run(tokenizer: str, checkpoint: str = "/tmp/serve-7b", out: str | None = None, max_batch: int = 128,
        n_ctx: int = 1024, levels: tuple[int, ...] = (1, 8, 32, 128), tokens: int = 64, words: int = 40,
        bench_batches: tuple[int, ...] = (1, 32), extra: str = "", switch_interval: float | None = None,
        tp: int = 1, waves: int = 2, checks: bool = True, temperature: float = 0.0, client_procs: int = 4,
        trace: str | None = None) -> dict:
    """extra: more `serve` flags, given with `=` (`--extra="--cuda_graphs False"`: fire reads a separate value
    that starts with `--` as a flag of its own); switch_interval: the server
    process's sys.setswitchinterval (how long a thread holds the GIL while another waits; Python's is 5 ms);
    tp: tensor-parallel ranks, started by torchrun (bench's figures are then left out: they are one GPU's);
    waves: each level sends this many times its concurrency of requests; checks: the shared prefix, long prompts
    and nothing-lost runs after the levels (False: the levels alone, for an A/B); temperature: the levels'
    sampling (llama.cpp's other defaults: top-k 40, top-p 0.95, min-p 0.05; 0 is greedy); client_procs: the
    processes the levels' clients are shared out over (each level's concurrency split between at most that many);
    trace: write the server's engine steps to this file and report their summary over the whole run
    (benchmarks/engine_trace.py; one server process: tp 1)."""
    if not isinstance(extra, str):
        raise SystemExit(f'--extra is a string of serve flags, given with "=" (--extra="--flag value"); got {extra!r}')
    path = Path(checkpoint)
    result: dict = {"checkpoint": checkpoint, "max_batch": max_batch, "n_ctx": n_ctx, "extra": extra,
                    "switch_interval": switch_interval, "tp": tp, "temperature": temperature,
                    "client_procs": client_procs}
    if checkpoint != "smollm2" and not path.exists():  # (smollm2: a quick run of the script on a CPU)
        result["checkpoint_write_s"] = write_checkpoint(path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    setup = [f"sys.setswitchinterval({switch_interval})"] if switch_interval is not None else []
    if trace:
        if tp > 1:
            raise SystemExit("--trace follows one server process: run it with --tp 1")
        trace = str(Path(trace).resolve())
        setup.append(f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from engine_trace import install; "
                     f"install({trace!r})")
    launch = ["-c", "; ".join(["import sys", *setup, "from llama_dist.cli import main; main()"])] if setup else [
        "-m", "llama_dist.cli"]
    if tp > 1:
        launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(tp), *launch]
    cmd = [sys.executable, *launch, "serve", "--model", str(path), "--tokenizer", tokenizer,
           "--port", str(port), "--max_batch", str(max_batch), "--n_ctx", str(n_ctx), "--max_queue", "1024",
           *extra.split()]
    start = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=sys.stderr, stderr=sys.stderr)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        result["ready_s"] = time.perf_counter() - start
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(client_procs, spawn, initializer=join_clients,
                                                    initargs=(spawn.Barrier(client_procs),)) as clients:
            for started in [clients.submit(meet_clients) for _ in range(client_procs)]:
                started.result()
            for i, c in enumerate(levels):
                result[f"concurrency_{c}"] = load_level(clients, client_procs, url, c, max(waves * c, 8), tokens,
                                                        words, 1000 * i, temperature)
                print(json.dumps({f"concurrency_{c}": result[f"concurrency_{c}"]}), flush=True)
        if checks:
            result["shared_prefix"] = asyncio.run(shared_prefix(url, min(900, n_ctx - 64)))
            result["long_prompts_arriving"] = asyncio.run(long_prompts_arriving(url, 16, 256, min(900, n_ctx - 64),
                                                                                8))
            result["nothing_lost"] = asyncio.run(nothing_lost(url))
    finally:
        server.terminate()
        result["server_exit"] = server.wait(timeout=120)
    if trace:
        from engine_trace import summary  # (benchmarks/, this script's folder)

        result["engine_trace"] = summary(trace, max_batch)
    if bench_batches and tp == 1:
        from llama_dist.bench import bench

        figures = bench(model=str(path), batches=tuple(bench_batches), hf=False, n_ctx=n_ctx,
                        compile=False, quantize="none")
        result["bench"] = {k: v for k, v in figures.items() if k.startswith(("decode_", "prefill", "ceiling"))}
        for c, b in ((1, 1), (32, 32)):
            if f"concurrency_{c}" in result and f"decode_b{b}_tok_s" in figures:
                served = result[f"concurrency_{c}"]["tok_s"]
                result[f"serve_c{c}_over_bench_b{b}"] = served / figures[f"decode_b{b}_tok_s"]
    print(json.dumps(result, indent=1))
    if out:
        name = f"serve_gpu_tp{tp}{extra}_{switch_interval or ''}".replace(" ", "").replace("-", "_")
        Path(out, f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    fire.Fire({"tokenizer": tokenizer, "run": run})
