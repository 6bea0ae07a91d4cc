"""What constrained decoding costs: decode tokens/s of the serving engine with and without a JSON schema on every
request, same model, same batch, alternating repetitions in one process.

    python benchmarks/constrained_decode.py [--batch 8] [--tokens 64] [--reps 3]

Each repetition submits `batch` requests at once (the bundled SmolLM2, default flags) and times the whole batch
from submission to the last answer; the figure is generated tokens / seconds. The schema (an array of integers)
lets the answer run to the token limit, so both sides generate the same number of tokens.
"""
from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_dist import Llama  # noqa: E402
from llama_dist.generation.constraints import Constraint, json_schema_grammar  # noqa: E402
from llama_dist.generation.sampling import SamplingParams  # noqa: E402
from llama_dist.serving.engine import Engine, Request  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "integer"}}


def run(engine: Engine, llama: Llama, batch: int, tokens: int, constrained: bool) -> tuple[float, int]:
    done: queue.Queue = queue.Queue()
    reqs = []
    for i in range(batch):
        ids = llama.tokenizer.encode(f"List {i + 3} numbers as a JSON array:", bos=True)
        constraint = (Constraint(json_schema_grammar(SCHEMA), llama.tokenizer, llama.model.args.vocab_size)
                      if constrained else None)
        reqs.append(Request(ids, SamplingParams(temperature=0.0), tokens, on_event=lambda e: e["type"] != "token"
                            and done.put(e), ignore_eos=True, constraint=constraint))
    start = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    events = [done.get(timeout=600) for _ in reqs]
    elapsed = time.perf_counter() - start
    assert all(e["type"] == "done" for e in events), events
    if constrained:
        for r in reqs:
            text = llama.tokenizer.decode(r.generated)
            if r.constraint.finished:
                json.loads(text)
    return sum(len(r.generated) for r in reqs) / elapsed, sum(len(r.generated) for r in reqs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    llama = Llama.build("smollm2", max_seq_len=256, max_batch_size=a.batch)
    engine = Engine(llama, max_batch=a.batch)
    threading.Thread(target=engine.run, daemon=True).start()
    run(engine, llama, a.batch, 8, True)  # warm up (and build the grammar tokenizer once)
    figures: dict[str, list[float]] = {"free": [], "json_schema": []}
    counts = {}
    for _ in range(a.reps):
        for name in figures:
            tok_s, n = run(engine, llama, a.batch, a.tokens, name == "json_schema")
            figures[name].append(tok_s)
            counts[name] = n
    engine.stopping.set()
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(json.dumps({"batch": a.batch, "tokens_per_request": a.tokens, "reps": a.reps, "tokens": counts,
                      "decode_tok_s": {k: round(v, 1) for k, v in med.items()},
                      "all_tok_s": {k: [round(x, 1) for x in v] for k, v in figures.items()},
                      "constrained_cost": round(1 - med["json_schema"] / med["free"], 3)}, indent=1))


if __name__ == "__main__":
    main()
