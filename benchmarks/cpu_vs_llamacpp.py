"""llama-dist vs llama.cpp (llama-cpp-python) on the same GGUF, prompt and thread count, same run.

    pip install llama-cpp-python==0.3.36   # compiles for ~5 minutes; not a CI dependency
    python benchmarks/cpu_vs_llamacpp.py [--reps 5] [--threads 2] [--tp 3] [--baseline DIR] [--model M.gguf]
        [--prompt_tokens 100] [--compiled True]

Each repetition runs each engine in a fresh process (alternating), with a 100-token prompt (--prompt_tokens) and
128 greedy tokens; the table shows medians. The model is the bundled SmolLM2 unless --model names a GGUF
(benchmarks/tinyllama_gguf.py writes a TinyLlama-1.1B-shaped one). llama-dist runs with its defaults and, unless
--compiled False, with --compile (the decode step compiled by inductor; its compile time is printed apart, and
decode is timed after it).
--tp 3 adds llama-dist tensor-parallel over Gloo, one thread per rank (SmolLM2's 9 heads allow
TP=1, 3 and 9 only, so TP=2 cannot split it). --baseline DIR adds the llama_dist package of another
checkout (an A/B of a change: `git worktree add DIR <commit>`), eager and compiled, alternating with the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_WORDS = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
                "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
                "produce books quickly and cheaply. Before that, texts were copied by hand, and a single Bible "
                "could take a scribe years to finish. The new machines spread across Europe within decades, ")


def run_llamacpp(model: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    import time

    t0 = time.perf_counter()
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=n_prompt + n_gen + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    load = time.perf_counter() - t0
    ids = llm.tokenize((PROMPT_WORDS * 20).encode(), add_bos=False)[:n_prompt]
    t = time.perf_counter()
    llm.eval(ids)
    prompt_s = time.perf_counter() - t
    t = time.perf_counter()
    tok = None
    for _ in range(n_gen):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    decode_s = time.perf_counter() - t
    return {"load_s": load, "prompt_tok_s": len(ids) / prompt_s, "decode_tok_s": n_gen / decode_s}


def run_ours(model: str, threads: int, n_prompt: int, n_gen: int, compile: bool = False) -> dict:
    import time

    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from llama_dist import Llama

    llama = Llama.build(model, max_seq_len=n_prompt + n_gen + 8, max_batch_size=1, compile=compile)
    load = time.perf_counter() - t0
    ids = llama.tokenizer.encode(PROMPT_WORDS * 20, bos=False)[:n_prompt]
    t = time.perf_counter()
    logits = llama.model(torch.tensor([ids]), 0, last_only=True)
    prompt_s = time.perf_counter() - t
    pos, result = len(ids), {}
    decode = llama.runner.decode if hasattr(llama, "runner") else llama.decode  # (a --baseline before runner/)
    if compile:  # the first step compiles (inductor's cache on disk makes later processes faster)
        t = time.perf_counter()
        logits = decode(logits[:, -1].argmax(-1, keepdim=True), pos)
        pos += 1
        result["compile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_gen):
        nxt = llama.ctx.comm.broadcast(logits[:, -1].argmax(-1, keepdim=True))
        logits = decode(nxt, pos)
        pos += 1
    decode_s = time.perf_counter() - t
    return {"load_s": load, "prompt_tok_s": len(ids) / prompt_s, "decode_tok_s": n_gen / decode_s, **result}


def child(engine: str, model: str, threads: int, n_prompt: int) -> None:
    import resource

    run = {"llamacpp": run_llamacpp, "ours": run_ours, "ours-compiled": partial(run_ours, compile=True)}[engine]
    result = run(model, threads, n_prompt, 128)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))


def measure(engine: str, model: str, threads: int, n_prompt: int, world: int = 1,
            package_root: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--model", model, "--threads", str(threads),
           "--prompt_tokens", str(n_prompt)]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if package_root:
        env["PYTHONPATH"] = package_root
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not line:
        raise RuntimeError(f"{engine} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tp", type=int, default=0)
    p.add_argument("--child")
    p.add_argument("--model", help="a GGUF file (default: the bundled SmolLM2)")
    p.add_argument("--prompt_tokens", type=int, default=100)
    p.add_argument("--compiled", type=lambda v: v.lower() not in ("0", "false", "no"), default=True)
    p.add_argument("--baseline", help="another checkout whose llama_dist runs beside this one")
    a = p.parse_args()
    if a.child:
        return child(a.child, a.model, a.threads, a.prompt_tokens)
    sys.path.insert(0, str(ROOT))
    from llama_dist.checkpoint.bundled import bundled_model_path

    model, n = a.model or str(bundled_model_path()), a.prompt_tokens
    engines = [("ours", "llama-dist")] + ([("ours-compiled", "llama-dist --compile")] if a.compiled else [])
    runs = {"llama.cpp": [], **{label: [] for _, label in engines}, f"llama-dist TP={a.tp} (Gloo, 1 thread/rank)": []}
    for _ in range(a.reps):
        runs["llama.cpp"].append(measure("llamacpp", model, a.threads, n))
        for engine, label in engines:
            runs[label].append(measure(engine, model, a.threads, n))
        if a.tp:
            runs[f"llama-dist TP={a.tp} (Gloo, 1 thread/rank)"].append(measure("ours", model, 1, n, world=a.tp))
        if a.baseline:
            for engine, label in engines:
                runs.setdefault(label.replace("llama-dist", "baseline"), []).append(
                    measure(engine, model, a.threads, n, package_root=a.baseline))
    keys = ("load_s", "prompt_tok_s", "decode_tok_s", "peak_rss_mib")
    med = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items() if rs}
    name = Path(a.model).name if a.model else "SmolLM2-135M-Instruct Q4_1"
    print(f"{name}, {a.threads} threads, {n}-token prompt, 128 greedy tokens, medians of {a.reps} fresh processes")
    print("| engine | load s | prompt tok/s | decode tok/s | peak RSS MiB |\n|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['load_s']:.2f} | {m['prompt_tok_s']:.0f} | {m['decode_tok_s']:.1f} | "
              f"{m['peak_rss_mib']:.0f} |")
    ref = med["llama.cpp"]
    if a.compiled:
        compile_s = statistics.median(r["compile_s"] for r in runs["llama-dist --compile"])
        print(f"--compile: the first decode step took {compile_s:.1f} s (compilation; inductor's disk cache warm "
              "after the first repetition)")
    labels = [("defaults", "llama-dist")] + ([("--compile", "llama-dist --compile")] if a.compiled else [])
    if a.baseline:
        labels += [(f"baseline {label}", name.replace("llama-dist", "baseline")) for label, name in labels]
    for label, name in labels:
        ours = med[name]
        print(f"ours ({label})/llama.cpp: load {ours['load_s'] / ref['load_s']:.1f}x time, prompt "
              f"{ours['prompt_tok_s'] / ref['prompt_tok_s']:.2f}x, "
              f"decode {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x, "
              f"RSS {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
