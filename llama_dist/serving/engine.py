"""Continuous batching across tensor-parallel ranks and pipeline stages.

Rank 0 owns the requests. Each step it plans: which waiting requests take a free cache row and blocks of
the paged KV cache (starting from the longest cached prefix of their prompt, shared: kv_blocks.py), which
prompt chunks are read, and which running requests decode one token; where a running request needs a block
and none is free, the latest admitted gives its blocks back and waits to be read again (preempted, never
failed). It broadcasts that plan (with the block tables that changed), and every rank runs the same step, so
the model's collectives line up. While answers stream, a step's prompt tokens and decode rows together are at
most `prefill_chunk` (or one chunk), so a long prompt does not stall the streams already running (with none
streaming, up to IDLE_PREFILL_TOKENS: a burst of new requests is read at once). Chunks end at fixed positions (multiples
of prefill_chunk), decode attention takes each row alone, and rank 0 samples each request with its own
generator, so an answer does not depend on what else is running or was cached. Rank 0 streams text to
each request's listener and frees the row and its blocks when the request stops or its client goes away.

Where the prompt pass replays a CUDA graph (GPUs), a step's decode rows join its prompt chunks in that one
pass, as runs of one token: a separate decode step would read every weight a second time, and with requests
arriving continually about every other step reads a prompt. (GPUs make no promise that a row's bits do not
depend on its batch: cuBLAS picks kernels by shape. CPUs keep the two passes, whose per-row arithmetic is.)

Overlap (GPUs): every rank keeps each row's argmax on the device (Runner.chosen), rank 0 draws there the tokens
of sampled requests too (one rank), and where every token of a step is decided so, rank 0 plans and launches
the next step before reading them (the plan's decode token -1 stands for the device's), then reads them while the
device computes: the host's detokenizing and streaming cost no device time. A step holding a constrained,
repeat-penalty or log-probability request is read at once; a request whose token in flight ends it has computed
one token more, which is dropped.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generation.constraints import Constraint
from ..generation.llama import Llama
from ..generation.sampling import SamplingParams, final_probs, sample
from ..model.transformer import KV_BLOCK, to_device
from ..tokenizer.stream import TextStream
from .kv_blocks import KVBlocks
from .metrics import Metrics

IDLE_PLAN_EVERY_S = 0.5  # an idle driver still broadcasts, so followers' collectives never time out
PREFILL_CHUNK = 256  # prompt tokens read per step: longer prompts take several steps, decode steps between
IDLE_PREFILL_TOKENS = 4096  # prompt tokens a step may read while no answer streams (none to keep flowing)


class QueueFull(Exception):
    pass


def check_overlap(overlap: bool | None, pipelined: bool) -> None:
    """Refuse overlap on a pipeline: its first stage has no logits to choose the next token from."""
    if overlap and pipelined:
        raise ValueError("--overlap needs one pipeline stage (--pp 1): a pipeline's first stage has no logits to "
                         "choose the next token from.")


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


def token_probs(probs: torch.Tensor, token: int, top: int) -> dict:
    """The chosen token's probability and the `top` likeliest (none of probability 0), from the distribution the
    sampler drew from (after its settings: llama.cpp's post-sampling probabilities)."""
    best = probs.topk(min(top, int((probs > 0).sum()))) if top else None
    return {"id": token, "prob": float(probs[token]),
            "top": [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))}


def timings(r: "Request") -> dict:
    """llama.cpp's timings of a request so far: prompt tokens read (and reused), answer tokens, milliseconds."""
    predicted_ms = (time.perf_counter() - r.t_first) * 1e3 if r.t_first else 0.0
    prompt_n = len(r.prompt_ids) - r.reused
    return {"cache_n": r.reused, "prompt_n": prompt_n, "prompt_ms": r.prompt_ms,
            "prompt_per_second": prompt_n / max(r.prompt_ms, 1e-9) * 1e3,
            "predicted_n": len(r.generated), "predicted_ms": predicted_ms,
            "predicted_per_second": len(r.generated) / max(predicted_ms, 1e-9) * 1e3}


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    on_event: Callable[[dict], None]  # called from the engine thread: {"token"...} then one {"done"...}
    # ({"progress"...} first, with return_progress)
    stop_words: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None  # report each chosen token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # and each prompt token's given those before it, with this many
    # alternatives (OpenAI's echo with logprobs, vLLM's prompt_logprobs): the prompt is read whole, not cached
    post_sampling: bool = False  # ... as probabilities after the sampler's settings (llama.cpp's post_sampling_probs)
    ignore_eos: bool = False  # never choose an end token (llama.cpp's ignore_eos)
    constraint: Constraint | None = None  # a schema or grammar the output must follow
    embed: bool = False  # read the prompt and answer its pooled, L2-normalised final hidden state
    n_keep: int | None = None  # context shift: when the context is full, keep these first tokens and drop half
    # the rest, then go on (llama.cpp's --context-shift); None: a full context ends the answer
    prompt_truncated: bool = False  # the prompt was cut to fit the context
    cache_prompt: bool = True  # start from a prefix of the prompt a cache slot already holds (llama.cpp's name)
    timings_per_token: bool = False  # each streamed event carries the timings so far (llama.cpp's name)
    return_progress: bool = False  # a {"progress"} event as the prompt is read, chunk by chunk (llama.cpp's name)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the engine
    slot: int = -1
    reused: int = 0  # prompt tokens found in the cache, not read again
    cached: int = 0  # tokens of context() whose keys and values are in the slot
    pending: int = 0  # tokens a pass has chosen on the device that the host has not read yet
    finished: bool = False  # its last event was sent
    preempted: int = 0  # times its blocks were given back for others' (then its context was read again)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text streamed
    tokens_sent: int = 0  # tokens of generated streamed
    t_submit: float = 0.0
    t_first: float = 0.0
    t_prompt: float = 0.0  # when its first prompt chunk was read
    t_last: float = 0.0  # when the last token was chosen
    prompt_ms: float = 0.0
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    logprobs: list[dict] = field(default_factory=list)  # per generated token, when top_logprobs is set
    prompt_token_logprobs: list[dict] = field(default_factory=list)  # per prompt token, when prompt_logprobs is
    # set (the first, which nothing precedes, with logprob and top None)
    embedding: list[float] | None = None
    dropped: int = 0  # tokens after the first n_keep that context shifts have dropped

    def context(self) -> list[int]:
        """The tokens in the cache: the prompt and the answer, less what context shifts dropped."""
        ids = self.prompt_ids + self.generated
        keep = self.n_keep or 0
        return ids[:keep] + ids[keep + self.dropped:]

    def context_length(self) -> int:
        """len(context()), without building it (asked every step)."""
        return len(self.prompt_ids) + len(self.generated) - self.dropped

    def planned_length(self) -> int:
        """context_length() with the tokens chosen on the device that the host has not read yet."""
        return self.context_length() + self.pending

    def cancel(self) -> None:
        self.cancelled.set()

    def plain_greedy(self) -> bool:
        """The likeliest token (of the allowed ones, with ignore_eos), nothing else changing the logits first:
        the batch's one argmax answers it."""
        p = self.params
        return p.temperature <= 0 and not p.logit_bias and not p.penalises() and self.constraint is None

    def decided_on_device(self, one_rank: bool) -> bool:
        """Its token depends on its logits alone (no grammar, no penalty over its history): the batch's argmax
        where it is plain greedy, else drawn on the device with its own generator where one rank chooses (other
        ranks could not draw the same to feed it to their next step)."""
        return self.constraint is None and not self.params.penalises() and (self.plain_greedy() or one_rank)


@dataclass
class Chunk:
    """Prompt (or shifted context) tokens a step reads into a slot at start..; `last`: they end what was
    pending, so their final logits choose the next token; `every`: every token's logits are wanted (prompt
    log-probabilities), so the chunk is read in a pass of its own."""

    slot: int
    start: int
    ids: list[int]
    last: bool
    every: bool = False


@dataclass
class StepPlan:
    """What every rank does this step, in this order (rank 0 makes it; the others receive it)."""

    blocks: list[tuple[int, int, int]] = field(default_factory=list)  # block table entries: (slot, index, block)
    embed: list[tuple[int, list[int]]] = field(default_factory=list)  # (slot, prompt): pooled hidden state
    prefill: list[Chunk] = field(default_factory=list)
    decode: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, token, position): token -1 is the
    # one the device chose for the slot last (Runner.chosen)
    endless: list[int] = field(default_factory=list)  # slots whose requests never choose an end token (ignore_eos)
    shutdown: bool = False


@dataclass
class Choices:
    """The requests a pass chose a token for (rank 0), their logits rows, and the tokens chosen on the device on
    their way to the host: read them once `ready` has passed (a copy that does not hold up the device)."""

    requests: list[Request | None]
    logits: torch.Tensor  # [rows, vocab]
    chosen: torch.Tensor  # [rows], on the host
    decided: list[bool]  # whether each row's token is its request's (else the host chooses from its logits)
    ready: torch.cuda.Event | None

    def tokens(self) -> list[int | None]:
        if self.ready is not None:
            self.ready.synchronize()
        return [token if decided else None for token, decided in zip(self.chosen.tolist(), self.decided)]

    def may_run_ahead(self) -> bool:
        """Every token is decided and nothing else of the logits is wanted: the next step may take them on the
        device before the host has read them."""
        return all(d and (r is None or r.top_logprobs is None) for r, d in zip(self.requests, self.decided))


class Engine:
    def __init__(self, llama: Llama, max_batch: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK, fold_decode: bool | None = None, overlap: bool | None = None):
        """fold_decode: decode rows join a step's prompt pass (None: where that pass replays a CUDA graph; never
        with batch-invariant kernels, as a decode row there would take the prompts' attention kernel).
        overlap: launch each step before the host reads the tokens the step before chose, where every one of
        them was decided on the device (None: on GPUs, where the host's work then runs while the device computes;
        one stage only)."""
        self.llama, self.runner, self.model, self.ctx = llama, llama.runner, llama.model, llama.ctx
        self.fold_decode = False if self.runner.batch_invariant else fold_decode
        check_overlap(overlap, self.runner.stage.pipelined)
        self.overlap = overlap if overlap is not None else (self.ctx.device.type == "cuda"
                                                             and not self.runner.stage.pipelined)
        self.inflight: Choices | None = None  # a step's choices the host has not read yet (with overlap)
        self.max_batch = min(max_batch or self.model.max_batch_size, self.model.max_batch_size)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: a step must read at least one prompt token.")
        self.prefill_chunk = prefill_chunk
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.next_up: collections.deque[Request] = collections.deque()  # before the queue: preempted, or waiting
        # for blocks
        self.running: dict[int, Request] = {}  # by slot, in the order they were admitted
        # GPUs reuse cached prefixes block by block (kv_blocks.py says why that loses no exactness there)
        self.kv = KVBlocks(self.model.n_blocks, KV_BLOCK, self.max_batch, prefill_chunk,
                           by_block=self.ctx.device.type == "cuda")
        self.stopping = threading.Event()
        self.end_tokens = torch.zeros(self.model.args.vocab_size, dtype=torch.bool, device=self.ctx.device)
        self.end_tokens[torch.tensor(sorted(llama.tokenizer.stop_ids), device=self.ctx.device)] = True
        self.metrics = Metrics(queued=self.queued,
                               running=lambda: len(self.running), cache_tokens=lambda: self.kv.in_use() * KV_BLOCK,
                               cache_capacity=self.model.n_blocks * KV_BLOCK)
        self._warm_up()

    def _warm_up(self) -> None:
        """A prompt chunk and a decode step in slot 0 (its blocks hold nothing the engine knows of), on every
        rank at once: libraries set themselves up now, not in the first request's time to first token."""
        device = self.ctx.device
        self.runner.prefill([(0, 0, [0] * 8)])
        self.runner.decode(torch.zeros((1, 1), dtype=torch.long, device=device), [8], torch.zeros(1, dtype=torch.long,
                                                                                                  device=device))

    # ---- rank 0 side -------------------------------------------------------------------------
    def queued(self) -> int:
        """Requests waiting to run (new ones, and preempted ones waiting to be read again)."""
        return self.waiting.qsize() + len(self.next_up)

    def submit(self, request: Request) -> None:
        if self.stopping.is_set():
            raise QueueFull("the server is shutting down")
        request.t_submit = time.perf_counter()
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting") from None

    def _plan(self) -> StepPlan:
        for r in [r for r in (*self.running.values(), *self.next_up) if r.cancelled.is_set()]:
            self._leave(r)
            self._finish(r, "cancelled")
        self.next_up = collections.deque(r for r in self.next_up if not r.cancelled.is_set())
        if self.stopping.is_set():
            for r in [*self.running.values(), *self.next_up]:
                self._leave(r)
                self._finish(r, "cancelled")
            self.next_up.clear()
            while not self.waiting.empty():
                self._finish(self.waiting.get_nowait(), "cancelled")
            return StepPlan(shutdown=True)
        plan = StepPlan()
        self._grow()
        self._admit(plan)
        reading = []
        for slot, r in self.running.items():
            if r.embed:
                continue
            length = r.planned_length()
            if not ((r.generated or r.pending) and r.cached == length - 1):
                reading.append(r)
            elif length < self.model.n_ctx and len(r.generated) + r.pending < r.max_new_tokens:  # one to write
                token = -1 if r.pending else r.generated[-1]  # (else the token in flight ends the answer)
                plan.decode.append((slot, token, r.cached))
                self.kv.wrote(slot, r.cached, [token])
                r.cached += 1
        # while answers stream, prompt tokens and decode rows together: the rows join the prompt pass, whose graph
        # is that of the next token bucket up (a full chunk's worth of prompts and the rows would double the pass)
        streaming = any(r.generated or r.pending for r in self.running.values())
        budget = self.prefill_chunk - len(plan.decode) if streaming else max(self.prefill_chunk, IDLE_PREFILL_TOKENS)
        prefill_tokens = 0
        for r in reading:
            slot = r.slot
            # chunks end at fixed positions: the same whatever else runs, or was cached before
            context = r.context()
            while r.cached < len(context):
                n = self.kv.chunk_end(r.cached, len(context)) - r.cached
                if prefill_tokens and prefill_tokens + n > budget:
                    break  # the step has its share of prompt tokens: next step
                ids = context[r.cached:r.cached + n]
                plan.prefill.append(Chunk(slot, r.cached, ids, last=r.cached + n == len(context),
                                          every=r.prompt_logprobs is not None and not r.generated))
                self.kv.wrote(slot, r.cached, ids, prompt_chunk=True)
                r.cached += n
                prefill_tokens += n
        plan.blocks = self.kv.take_changes()
        plan.endless = [slot for slot, r in self.running.items() if r.ignore_eos]
        if plan.decode or plan.prefill:
            self.metrics.step(len(plan.decode), prefill_tokens)
        return plan

    def _grow(self) -> None:
        """Blocks for what each running request writes this step, in the order they were admitted; where none is
        free, the latest admitted (perhaps the request itself) is preempted: its blocks go back, and it waits at
        the front of the queue to read its context again (from the prefix still cached)."""
        for r in list(self.running.values()):
            while self.running.get(r.slot) is r and not self.kv.grow(r.slot, r.planned_length()):
                if self.inflight is not None:  # the tokens in flight may end requests: read them first
                    self._settle()
                    continue
                victim = next(reversed(self.running.values()))
                self._leave(victim)
                victim.cached, victim.preempted = 0, victim.preempted + 1
                self.metrics.preempted.inc()
                self.next_up.appendleft(victim)

    def _admit(self, plan: StepPlan) -> None:
        """Requests into free slots, preempted ones first (waiting up to IDLE_PLAN_EVERY_S when nothing runs),
        while the cache has blocks for their prompts; each starts from the longest prefix of its prompt the
        cache holds."""
        free = [s for s in range(self.max_batch) if s not in self.running]
        deadline = time.monotonic() + (0 if self.running else IDLE_PLAN_EVERY_S)
        while free:
            try:
                r = self.next_up.popleft() if self.next_up else self.waiting.get(
                    timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if r.cancelled.is_set():
                self._finish(r, "cancelled")
                continue
            context = r.context()
            if self.kv.blocks_for(len(context)) > self.kv.n_blocks:
                r.on_event({"type": "error", "message": f"{len(context)} tokens do not fit the KV cache "
                                                        f"({self.kv.n_blocks * KV_BLOCK} tokens): shorten the "
                                                        "prompt or raise kv_tokens"})
                continue
            reused = self.kv.place(free[0], context, reuse=r.cache_prompt and not r.embed
                                   and r.prompt_logprobs is None)
            if reused is None:  # too few free blocks: it goes first once running requests give some back
                self.next_up.appendleft(r)
                return
            r.slot, r.cached = free.pop(0), reused
            if not r.preempted:
                r.reused = reused
                r.prompt_token_logprobs = ([{"id": r.prompt_ids[0], "logprob": None, "top": None}]
                                           if r.prompt_logprobs is not None else [])
                r.stream = TextStream(self.llama.tokenizer)
                if r.seed is not None:
                    r.generator = torch.Generator(device=self.ctx.device).manual_seed(r.seed)
            if r.embed:
                plan.embed.append((r.slot, r.prompt_ids))
                self.kv.wrote(r.slot, 0, r.prompt_ids)
            elif r.return_progress and not r.preempted:
                self._progress(r, r.reused)
            self.running[r.slot] = r
            deadline = time.monotonic()  # take what is queued now, then run

    def _leave(self, r: Request) -> None:
        """The request no longer runs: its slot and blocks are free."""
        if self.running.get(r.slot) is r:
            del self.running[r.slot]
            self.kv.release(r.slot)

    def _emit_text(self, r: Request, final: bool) -> None:
        hold = 0 if final else max((len(w) for w in r.stop_words), default=1) - 1
        upto = max(r.sent, len(r.text) - hold)
        if upto > r.sent:  # the text, with the tokens chosen since the last event (and their log-probabilities)
            event = {"type": "token", "text": r.text[r.sent:upto], "tokens": r.generated[r.tokens_sent:],
                     "logprobs": r.logprobs[r.tokens_sent:] if r.top_logprobs is not None else None}
            if r.timings_per_token:
                event["timings"] = timings(r)
            r.on_event(event)
            r.sent, r.tokens_sent = upto, len(r.generated)

    def _progress(self, r: Request, processed: int) -> None:
        """llama.cpp's prompt_progress: the prompt's tokens, those found in the cache, those in it now."""
        elapsed = (time.perf_counter() - r.t_prompt) * 1e3 if r.t_prompt else 0.0
        r.on_event({"type": "progress", "prompt_progress": {"total": len(r.prompt_ids), "cache": r.reused,
                                                           "processed": processed, "time_ms": elapsed}})

    def _finish(self, r: Request, stop_type: str, stopping_word: str = "") -> None:
        r.finished = True
        if stop_type != "cancelled":
            self._emit_text(r, final=True)
        self.metrics.requests.labels(stop_type).inc()
        r.on_event({"type": "done", "stop_type": stop_type, "stopping_word": stopping_word,
                    "embedding": r.embedding, "timings": timings(r)})

    def _accept(self, r: Request, logits: torch.Tensor, token: int | None) -> None:
        """Take this request's next token and decide whether it is done. logits: its row, end tokens masked where
        it ignores them; token: chosen on the device (Engine._choose), or None: chosen here (a grammar's mask,
        penalties over its history)."""
        if r.max_new_tokens == 0:  # the prompt was only to be read
            return self._done(r, "limit")
        wants_probs = r.top_logprobs is not None
        history = r.prompt_ids + r.generated if token is None or (wants_probs and r.post_sampling) else None
        if token is None:
            if r.constraint is not None:
                logits = r.constraint.mask(logits)
            token = int(sample(logits[None], r.params, r.generator, [history])[0])
        now = time.perf_counter()
        if r.generated:
            self.metrics.inter_token.observe(now - r.t_last)
        else:
            self.metrics.time_to_first_token.observe(now - r.t_submit)
        r.t_last = now
        self.metrics.generated_tokens.inc()
        if token in self.llama.tokenizer.stop_ids:
            return self._done(r, "eos")
        if wants_probs:
            r.logprobs.append(token_probs(final_probs(logits, r.params, history), token, r.top_logprobs)
                              if r.post_sampling else token_logprobs(logits, token, r.top_logprobs))
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
        if full:  # drop half of what follows the kept tokens; the next steps read the rest again
            r.dropped += (self.model.n_ctx - r.n_keep) // 2
            r.cached = self.kv.truncate(r.slot, r.n_keep)
        self._emit_text(r, final=False)

    def _done(self, r: Request, stop_type: str, word: str = "") -> None:
        self._leave(r)
        self._finish(r, stop_type, word)

    # ---- every rank ----------------------------------------------------------------------------
    def run(self) -> None:
        """The SPMD loop: rank 0 plans and broadcasts; all ranks execute. Returns on shutdown. With overlap, rank
        0 reads a step's tokens after launching the next one (which takes them on the device), so its host work
        (choosing, detokenizing, events, the next plan) runs while the device computes."""
        while True:
            plan = self._plan() if self.ctx.is_driver else None
            plan = self.ctx.comm.broadcast_object(plan)
            if plan.shutdown:
                self.inflight = None
                return
            choices = self._execute(plan)
            self._settle()
            if choices is not None:
                if self.overlap and choices.may_run_ahead():
                    self.inflight = choices
                else:
                    self._complete(choices)

    def _execute(self, plan: StepPlan) -> Choices | None:
        device, driver = self.ctx.device, self.ctx.is_driver
        self.model.assign_blocks(plan.blocks)
        for slot, ids in plan.embed:
            start = time.perf_counter()
            hidden = self.runner.forward(torch.tensor([ids], device=device), 0, slots=torch.tensor([slot], device=device),
                                         hidden=True)
            if driver:
                r = self.running[slot]
                self._leave(r)
                r.prompt_ms = (time.perf_counter() - start) * 1e3
                self.metrics.prompt_tokens.inc(len(ids))
                r.embedding = pool(hidden[0], self.model.args.pooling).tolist()
                self._finish(r, "embedding")
        chosen = any(token < 0 for _, token, _ in plan.decode)  # tokens the device holds
        packed = [(c.slot, c.start, c.ids) for c in plan.prefill if not c.every]
        folded = ([(slot, position, [token]) for slot, token, position in plan.decode]
                  if self._folds(packed, len(plan.decode)) else [])
        ended, folded_rows = self._read_prompts(plan.prefill, packed, folded, chosen) if plan.prefill else ([], [])
        slots, rows = [slot for slot, _ in ended], [row for _, row in ended] + folded_rows
        logits = [torch.stack(rows)] if rows else []
        if plan.decode and not folded:
            slots_in = to_device([slot for slot, _, _ in plan.decode], device)
            tokens = to_device([token for _, token, _ in plan.decode], device)
            tokens = self.runner.resolve(tokens, slots_in) if chosen else tokens
            logits.append(self.runner.decode(tokens[:, None], [position for _, _, position in plan.decode],
                                             slots_in)[:, -1])
        slots += [slot for slot, _, _ in plan.decode]
        return self._choose(slots, torch.cat(logits), plan.endless) if slots else None

    def _read_prompts(self, chunks: list[Chunk], packed: list[tuple[int, int, list[int]]],
                      folded: list[tuple[int, int, list[int]]], chosen: bool
                      ) -> tuple[list[tuple[int, torch.Tensor]], list[torch.Tensor]]:
        """Read a step's prompt chunks: those packed (with the decode rows folded in; chosen: some of their tokens
        are on the device) in one pass, those wanting every token's logits in a pass each. Returns the slot and
        last logits of each chunk that ends what its request had to read, and the folded rows' logits."""
        device, start = self.ctx.device, time.perf_counter()
        logits = self.runner.prefill(packed + folded, chosen) if packed else []
        in_pack, ended = iter(logits[:len(packed)]), []
        for c in chunks:
            if c.every:
                every = self.runner.forward(torch.tensor([c.ids], device=device), c.start,
                                            slots=torch.tensor([c.slot], device=device))[0]
                if self.ctx.is_driver:
                    self._prompt_logprobs(c, every)
                row = every[-1]
            else:
                row = next(in_pack)
            if c.last:
                ended.append((c.slot, row))
        if self.ctx.is_driver:
            self._prompts_read(chunks, start)
        return ended, logits[len(packed):]

    def _folds(self, chunks: list[tuple[int, int, list[int]]], n_decode: int) -> bool:
        """Whether this step's decode rows join its prompt pass (the same answer on every rank: the plan and the
        runner are the same everywhere)."""
        if not chunks or not n_decode:
            return False
        if self.fold_decode is None:  # (each chunk is at most a run, each decode row one)
            return self.runner.prompt_pass_graphed(sum(len(ids) for _, _, ids in chunks) + n_decode,
                                                   len(chunks) + n_decode)
        return self.fold_decode

    def _prompts_read(self, chunks: list[Chunk], start: float) -> None:
        """Rank 0 after a prefill pass: what the requests record of reading their prompts."""
        for chunk in chunks:
            r = self.running.get(chunk.slot)
            if r is None:
                continue
            self.metrics.prompt_tokens.inc(len(chunk.ids))
            r.t_prompt = r.t_prompt or start
            if r.return_progress and not r.generated:
                self._progress(r, chunk.start + len(chunk.ids))
            if chunk.last and not r.generated:  # (not a context read again after a shift)
                r.prompt_ms, r.t_first = (time.perf_counter() - r.t_prompt) * 1e3, time.perf_counter()

    def _choose(self, slots: list[int], logits: torch.Tensor, endless: list[int]) -> Choices | None:
        """Every rank: each row's likeliest token (of the allowed ones: no end token for slots in `endless`), in
        one pass over the batch; rank 0 draws the sampled requests' tokens there too, where they depend on their
        logits alone. The tokens stay on the device as their slots' chosen ones, where the next step may read them
        there. Rank 0 returns the choices, their tokens on their way to the host."""
        if not (self.overlap or self.ctx.is_driver):
            return None
        endless = set(endless)
        banned = [slot in endless for slot in slots]
        if any(banned):  # (elementwise: an indexed write of -inf would copy it from the host, waiting for the pass)
            logits = torch.where(to_device(banned, logits.device)[:, None] & self.end_tokens, float("-inf"), logits)
        chosen = logits.argmax(-1)
        requests = [self.running.get(slot) for slot in slots] if self.ctx.is_driver else []
        decided = [r is None or r.decided_on_device(self.ctx.world_size == 1) for r in requests]
        self._draw(chosen, logits, requests, decided)
        if self.overlap:
            self.runner.chosen[to_device(slots, logits.device)] = chosen
        if not self.ctx.is_driver:
            return None
        for r in requests:
            if r is not None:
                r.pending += 1
        if chosen.device.type != "cuda":
            return Choices(requests, logits, chosen, decided, None)
        ready = torch.cuda.Event()
        host = chosen.to("cpu", non_blocking=True)
        ready.record()
        return Choices(requests, logits, host, decided, ready)

    @staticmethod
    def _draw(chosen: torch.Tensor, logits: torch.Tensor, requests: list[Request | None], decided: list[bool]) -> None:
        """Rank 0: in `chosen`, the tokens of the decided requests that are not plain greedy, drawn by the sampler
        on the device: a request with its own generator (a seed) alone, the others in one call per settings."""
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (r, d) in enumerate(zip(requests, decided)):
            if r is not None and d and not r.plain_greedy():
                groups.setdefault((id(r.generator), repr(r.params)), []).append(i)
        for rows in groups.values():
            r, index = requests[rows[0]], to_device(rows, chosen.device)
            chosen[index] = sample(logits[index], r.params, r.generator)

    def _settle(self) -> None:
        """Read the tokens in flight, if any (rank 0)."""
        if self.inflight is not None:
            choices, self.inflight = self.inflight, None
            self._complete(choices)

    def _complete(self, choices: Choices) -> None:
        """Rank 0: each request's token, as chosen on the device or (undecided there) chosen now, taken in."""
        for r, logits, token in zip(choices.requests, choices.logits, choices.tokens()):
            if r is not None and not r.finished:
                r.pending -= 1
                self._safely(r, logits, token)

    def _prompt_logprobs(self, chunk: Chunk, logits: torch.Tensor) -> None:
        """Rank 0: the log-probabilities of the prompt tokens this chunk's logits [tokens, vocab] predict (each
        row the next position's; one past the prompt is the answer's first token, chosen as usual)."""
        r = self.running.get(chunk.slot)
        if r is None:
            return
        for i, row in enumerate(logits):
            position = chunk.start + i + 1
            if position < len(r.prompt_ids) and position == len(r.prompt_token_logprobs):  # (once, if read again)
                r.prompt_token_logprobs.append(token_logprobs(row, r.prompt_ids[position], r.prompt_logprobs))

    def _safely(self, r: Request, logits: torch.Tensor, token: int | None) -> None:
        """An exception in one request's sampling or decoding fails that request only."""
        try:
            self._accept(r, logits, token)
        except Exception as e:  # noqa: BLE001
            self._leave(r)
            r.finished = True
            r.on_event({"type": "error", "message": f"{type(e).__name__}: {e}"})
