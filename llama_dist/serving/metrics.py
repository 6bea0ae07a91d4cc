"""What the server has done, for Prometheus (`GET /metrics`), through the prometheus client library.

Counters only grow; gauges are read when scraped. Names follow llama.cpp's server (`llamacpp:` becomes
`llamadist_`), with the request and latency families vLLM users expect.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROWS_BUCKETS = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
PROMPT_BUCKETS = (0, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self, queued: Callable[[], int], running: Callable[[], int], cache_tokens: Callable[[], int],
                 cache_capacity: int):
        """queued/running/cache_tokens: read at scrape time; cache_capacity: KV-cache positions (all blocks)."""
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("llamadist_requests", "Requests finished, by how they ended", ["stop_type"],
                                registry=registry)
        self.prompt_tokens = Counter("llamadist_prompt_tokens", "Prompt tokens read", registry=registry)
        self.preempted = Counter("llamadist_requests_preempted", "Times a running request gave its KV cache blocks "
                                 "back to earlier ones (and was read again later)", registry=registry)
        self.generated_tokens = Counter("llamadist_tokens_predicted", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram("llamadist_time_to_first_token_seconds",
                                             "From admission to the first generated token",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram("llamadist_inter_token_seconds", "Between a request's consecutive tokens",
                                     buckets=LATENCY_BUCKETS, registry=registry)
        # per engine step: how full its batch ran (tokens/s = steps/s x rows per step), and how much prompt it read
        self.step_decode_rows = Histogram("llamadist_step_decode_rows", "Running requests one engine step gave "
                                          "their next token", buckets=ROWS_BUCKETS, registry=registry)
        self.step_prompt_tokens = Histogram("llamadist_step_prompt_tokens", "Prompt tokens one engine step read",
                                            buckets=PROMPT_BUCKETS, registry=registry)
        Gauge("llamadist_requests_deferred", "Requests waiting for a slot or KV cache blocks (preempted ones too)",
              registry=registry).set_function(queued)
        Gauge("llamadist_requests_processing", "Requests in a slot", registry=registry).set_function(running)
        Gauge("llamadist_kv_cache_tokens", "KV-cache positions in blocks that sequences hold",
              registry=registry).set_function(cache_tokens)
        Gauge("llamadist_kv_cache_usage_ratio", "KV-cache positions in use / all positions",
              registry=registry).set_function(lambda: cache_tokens() / cache_capacity)

    def step(self, decode_rows: int, prompt_tokens: int) -> None:
        """An engine step with work in it."""
        self.step_decode_rows.observe(decode_rows)
        self.step_prompt_tokens.observe(prompt_tokens)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
