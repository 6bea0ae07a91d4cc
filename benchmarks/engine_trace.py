"""A server's engine steps, one line each, to see where a load level's time goes (serve_gpu.py --trace FILE).

install(path), called in the server process before it starts, wraps Engine._plan, submit and _finish: each
step that runs something writes `P time plan_s decode_rows prompt_tokens running queued`, each request `S time`
when submitted and `F time` when finished, and each garbage collection `G time seconds generation` (every thread
waits for one). summary(path) reads it back.
"""
from __future__ import annotations

import bisect
import collections
import gc
import time


def install(path: str) -> None:
    """Trace this process's engine to `path` from now on."""
    from llama_dist.serving import engine

    out = open(path, "w", buffering=1 << 16)
    plan, submit, finish = engine.Engine._plan, engine.Engine.submit, engine.Engine._finish

    def traced_plan(self):
        start = time.perf_counter()
        step = plan(self)
        if step.decode or step.prefill:
            out.write(f"P {start:.6f} {time.perf_counter() - start:.6f} {len(step.decode)} "
                      f"{sum(len(c.ids) for c in step.prefill)} {len(self.running)} {self.queued()}\n")
        return step

    def traced_submit(self, request):
        out.write(f"S {time.perf_counter():.6f}\n")
        return submit(self, request)

    def traced_finish(self, request, *args, **kwargs):
        out.write(f"F {time.perf_counter():.6f}\n")
        out.flush()
        return finish(self, request, *args, **kwargs)

    engine.Engine._plan, engine.Engine.submit, engine.Engine._finish = traced_plan, traced_submit, traced_finish
    collecting = {}

    def traced_collection(phase: str, info: dict) -> None:
        if phase == "start":
            collecting["start"] = time.perf_counter()
        elif "start" in collecting:
            start = collecting.pop("start")
            out.write(f"G {start:.6f} {time.perf_counter() - start:.6f} {info['generation']}\n")

    gc.callbacks.append(traced_collection)


def summary(path: str, max_batch: int) -> dict:
    """How full the steps were; whether a free slot ever had a request waiting (admission the limit) or none (the
    clients); the step intervals with and without prompts; the clients' turnaround (a finish to the next
    submit); the collections; the rows of the first 400 steps (`+`: the step read prompts too)."""
    steps, submits, finishes, pauses = [], [], [], []
    for line in open(path):
        kind, *values = line.split()
        {"P": steps, "S": submits, "F": finishes, "G": pauses}[kind].append([float(v) for v in values])
    if not steps:
        return {"steps": 0}
    starts = [s[0] for s in steps]
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    with_prompt = [d for d, s in zip(intervals, steps) if s[3] > 0]
    decode_only = [d for d, s in zip(intervals, steps) if s[3] == 0]
    submitted = sorted(s[0] for s in submits)
    turnaround = sorted(submitted[i] - f[0] for f in finishes
                        if (i := bisect.bisect(submitted, f[0])) < len(submitted))
    free = [s for s in steps if s[4] < max_batch]

    def mean_ms(xs: list[float]) -> float:
        return round(1e3 * sum(xs) / max(len(xs), 1), 2)

    return {"steps": len(steps), "submits": len(submits), "finishes": len(finishes),
            "steps_by_decode_rows": dict(sorted(collections.Counter(int(s[2]) for s in steps).items())),
            "steps_with_a_free_slot": {"requests_queued": sum(s[5] > 0 for s in free),
                                       "none_queued": sum(s[5] == 0 for s in free)},
            "plan_ms": mean_ms([s[1] for s in steps]),
            "interval_ms": {"with_prompt": mean_ms(with_prompt), "decode_only": mean_ms(decode_only)},
            "turnaround_ms_p10_p50_p90": [round(1e3 * turnaround[int(q * (len(turnaround) - 1))], 2)
                                          for q in (0.1, 0.5, 0.9)] if turnaround else [],
            "collections_by_generation": dict(sorted(collections.Counter(int(c[2]) for c in pauses).items())),
            "collection_ms_max_by_generation": {int(g): round(1e3 * max(c[1] for c in pauses if c[2] == g), 2)
                                                for g in sorted({c[2] for c in pauses})},
            "rows": " ".join(f"{int(s[2])}{'+' if s[3] else ''}" for s in steps[:400])}
