"""Continuous batching across tensor-parallel ranks.

Rank 0 owns the requests. Each step it plans which waiting requests join (prefill into a free
cache slot) and which running ones decode one token, and broadcasts that plan; every rank runs
the same step, so the model's collectives line up. Rank 0 samples each request with its own
generator (seeded sampling does not depend on what else is in the batch), streams text to the
request's listener, and frees the slot when the request stops or its client goes away.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..generation.constraints import Constraint
from ..generation.llama import Llama
from ..generation.sampling import SamplingParams, sample_row
from ..tokenizer.stream import TextStream
from .metrics import Metrics

IDLE_PLAN_EVERY_S = 0.5  # an idle driver still broadcasts, so followers' collectives never time out


class QueueFull(Exception):
    pass


def pool(hidden: torch.Tensor, how: str) -> torch.Tensor:
    """One vector for a sequence's final hidden states [S, dim] (mean, the first token's, or the last's),
    scaled to unit length as OpenAI's and llama.cpp's embeddings are."""
    vector = {"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[how]
    return torch.nn.functional.normalize(vector.float(), dim=0)


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> dict:
    """The chosen token's log-probability and the `top` likeliest, from the logits before the sampler's settings
    (temperature, top-k, ...) but after the request's masks (ignore_eos, a grammar)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.topk(top) if top else None
    return {"id": token, "logprob": float(logp[token]),
            "top": [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))}


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    on_event: Callable[[dict], None]  # called from the engine thread: {"token"...} then one {"done"...}
    stop_words: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None  # report each chosen token's log-probability and this many alternatives
    ignore_eos: bool = False  # never choose an end token (llama.cpp's ignore_eos)
    constraint: Constraint | None = None  # a schema or grammar the output must follow
    embed: bool = False  # read the prompt and answer its pooled, L2-normalised final hidden state
    n_keep: int | None = None  # context shift: when the context is full, keep these first tokens and drop half
    # the rest, then go on (llama.cpp's --context-shift); None: a full context ends the answer
    prompt_truncated: bool = False  # the prompt was cut to fit the context
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the engine
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text streamed
    tokens_sent: int = 0  # tokens of generated streamed
    t_submit: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0  # when the last token was chosen
    prompt_ms: float = 0.0
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    logprobs: list[dict] = field(default_factory=list)  # per generated token, when top_logprobs is set
    embedding: list[float] | None = None
    dropped: int = 0  # tokens after the first n_keep that context shifts have dropped
    refill: bool = False  # the context was shifted: read it into the cache again before the next token

    def context(self) -> list[int]:
        """The tokens in the cache: the prompt and the answer, less what context shifts dropped."""
        ids = self.prompt_ids + self.generated
        keep = self.n_keep or 0
        return ids[:keep] + ids[keep + self.dropped:]

    def context_length(self) -> int:
        """len(context()), without building it (asked every step)."""
        return len(self.prompt_ids) + len(self.generated) - self.dropped

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, llama: Llama, max_batch: int | None = None, max_queue: int = 64):
        self.llama, self.runner, self.model, self.ctx = llama, llama.runner, llama.model, llama.ctx
        self.max_batch = min(max_batch or self.model.max_batch_size, self.model.max_batch_size)
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.running: dict[int, Request] = {}
        self.stopping = threading.Event()
        self.stop_ids = torch.tensor(sorted(llama.tokenizer.stop_ids), device=self.ctx.device)
        self.metrics = Metrics(queued=self.waiting.qsize, running=lambda: len(self.running),
                               cache_tokens=lambda: sum(r.context_length()
                                                        for r in list(self.running.values())),
                               cache_capacity=self.max_batch * self.model.n_ctx)

    # ---- rank 0 side -------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if self.stopping.is_set():
            raise QueueFull("the server is shutting down")
        request.t_submit = time.perf_counter()
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting") from None

    def _plan(self) -> dict[str, Any]:
        for slot in [s for s, r in self.running.items() if r.cancelled.is_set()]:
            self._finish(self.running.pop(slot), "cancelled")
        if self.stopping.is_set():
            for r in list(self.running.values()):
                self._finish(r, "cancelled")
            self.running.clear()
            while not self.waiting.empty():
                self._finish(self.waiting.get_nowait(), "cancelled")
            return {"shutdown": True}
        free = [s for s in range(self.max_batch) if s not in self.running]
        admitted = []
        deadline = time.monotonic() + (0 if self.running else IDLE_PLAN_EVERY_S)
        while free:
            try:
                r = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if r.cancelled.is_set():
                self._finish(r, "cancelled")
                continue
            r.slot = free.pop(0)
            r.stream = TextStream(self.llama.tokenizer)
            if r.seed is not None:
                r.generator = torch.Generator(device=self.ctx.device).manual_seed(r.seed)
            self.running[r.slot] = r
            admitted.append(r)
            deadline = time.monotonic()  # take what is queued now, then run
        decode = [(s, r.generated[-1], r.context_length() - 1)
                  for s, r in self.running.items() if r.generated and not r.refill]
        refill = [(s, r.context()) for s, r in self.running.items() if r.refill]
        for r in self.running.values():
            r.refill = False
        return {"prefill": [(r.slot, r.prompt_ids) for r in admitted if not r.embed] + refill, "decode": decode,
                "embed": [(r.slot, r.prompt_ids) for r in admitted if r.embed]}

    def _emit_text(self, r: Request, final: bool) -> None:
        hold = 0 if final else max((len(w) for w in r.stop_words), default=1) - 1
        upto = max(r.sent, len(r.text) - hold)
        if upto > r.sent:  # the text, with the tokens chosen since the last event (and their log-probabilities)
            r.on_event({"type": "token", "text": r.text[r.sent:upto], "tokens": r.generated[r.tokens_sent:],
                        "logprobs": r.logprobs[r.tokens_sent:] if r.top_logprobs is not None else None})
            r.sent, r.tokens_sent = upto, len(r.generated)

    def _finish(self, r: Request, stop_type: str, stopping_word: str = "") -> None:
        if stop_type != "cancelled":
            self._emit_text(r, final=True)
        self.metrics.requests.labels(stop_type).inc()
        now = time.perf_counter()
        predicted_ms = (now - r.t_first) * 1e3 if r.t_first else 0.0
        r.on_event({"type": "done", "stop_type": stop_type, "stopping_word": stopping_word,
                    "embedding": r.embedding, "timings": {
            "prompt_n": len(r.prompt_ids), "prompt_ms": r.prompt_ms,
            "prompt_per_second": len(r.prompt_ids) / max(r.prompt_ms, 1e-9) * 1e3,
            "predicted_n": len(r.generated), "predicted_ms": predicted_ms,
            "predicted_per_second": len(r.generated) / max(predicted_ms, 1e-9) * 1e3}})

    def _accept(self, r: Request, logits: torch.Tensor) -> None:
        """Sample this request's next token and decide whether it is done."""
        if r.max_new_tokens == 0:  # the prompt was only to be read
            return self._done(r, "limit")
        if r.ignore_eos:
            logits = logits.index_fill(0, self.stop_ids, float("-inf"))
        if r.constraint is not None:
            logits = r.constraint.mask(logits)
        token = sample_row(logits, r.params, r.generator, r.prompt_ids + r.generated)
        now = time.perf_counter()
        if r.generated:
            self.metrics.inter_token.observe(now - r.t_last)
        else:
            self.metrics.time_to_first_token.observe(now - r.t_submit)
        r.t_last = now
        self.metrics.generated_tokens.inc()
        if token in self.llama.tokenizer.stop_ids:
            return self._done(r, "eos")
        if r.top_logprobs is not None:
            r.logprobs.append(token_logprobs(logits, token, r.top_logprobs))
        r.generated.append(token)
        r.text += r.stream.push(token)
        if r.constraint is not None:
            r.constraint.consume(token)
            if r.constraint.finished:  # complete: only an end token could follow
                r.text += r.stream.flush()
                return self._done(r, "eos")
        for word in r.stop_words:
            at = r.text.find(word)
            if at >= 0:
                r.text = r.text[:at]
                return self._done(r, "word", word)
        full = r.context_length() >= self.model.n_ctx
        if len(r.generated) >= r.max_new_tokens or (full and r.n_keep is None):
            r.text += r.stream.flush()
            return self._done(r, "limit")
        if full:  # drop half of what follows the kept tokens; the next step reads the rest again
            r.dropped += (self.model.n_ctx - r.n_keep) // 2
            r.refill = True
        self._emit_text(r, final=False)

    def _done(self, r: Request, stop_type: str, word: str = "") -> None:
        self.running.pop(r.slot, None)
        self._finish(r, stop_type, word)

    # ---- every rank ----------------------------------------------------------------------------
    def run(self) -> None:
        """The SPMD loop: rank 0 plans and broadcasts; all ranks execute. Returns on shutdown."""
        while True:
            plan = self._plan() if self.ctx.is_driver else None
            plan = self.ctx.comm.broadcast_object(plan)
            if plan.get("shutdown"):
                return
            self._execute(plan)

    def _execute(self, plan: dict[str, Any]) -> None:
        device, driver = self.ctx.device, self.ctx.is_driver
        for slot, ids in plan["embed"]:
            start = time.perf_counter()
            hidden = self.runner.forward(torch.tensor([ids], device=device), 0, slots=torch.tensor([slot], device=device),
                                         hidden=True)
            if driver:
                r = self.running.pop(slot)
                r.prompt_ms = (time.perf_counter() - start) * 1e3
                self.metrics.prompt_tokens.inc(len(ids))
                r.embedding = pool(hidden[0], self.model.args.pooling).tolist()
                self._finish(r, "embedding")
        for slot, ids in plan["prefill"]:
            start = time.perf_counter()
            logits = self.runner.forward(torch.tensor([ids], device=device), 0, last_only=True,
                                         slots=torch.tensor([slot], device=device))
            if driver:
                r = self.running[slot]
                if not r.generated:  # (not a context read again after a shift)
                    r.prompt_ms, r.t_first = (time.perf_counter() - start) * 1e3, time.perf_counter()
                    self.metrics.prompt_tokens.inc(len(ids))
                self._safely(r, logits[0, -1])
        if plan["decode"]:
            slots, tokens, positions = zip(*plan["decode"])
            logits = self.runner.decode(torch.tensor(tokens, device=device)[:, None], list(positions),
                                        torch.tensor(slots, device=device))
            if driver:
                for i, (slot, _, _) in enumerate(plan["decode"]):
                    if slot in self.running:
                        self._safely(self.running[slot], logits[i, -1])

    def _safely(self, r: Request, logits: torch.Tensor) -> None:
        """An exception in one request's sampling or decoding fails that request only."""
        try:
            self._accept(r, logits)
        except Exception as e:  # noqa: BLE001
            self.running.pop(r.slot, None)
            r.on_event({"type": "error", "message": f"{type(e).__name__}: {e}"})
