"""`llama-dist chat`: an interactive multi-turn chat (or Meta-style raw completion loop) on the terminal, or
answers to prompts given on the command line.

Rank 0 reads stdin and prints; the engine runs the same continuous-batching loop as the server, so
under torchrun/mpirun every rank follows along. Ctrl-C stops the current answer, not the program.
"""
from __future__ import annotations

import queue
import sys
import threading

from ..checkpoint.config import LoadConfig
from ..distributed.layout import ParallelConfig
from ..generation.llama import Llama
from ..generation.sampling import SamplingParams
from ..tokenizer.chat import encode_dialog
from .engine import Engine, Request

COMMANDS = "/reset clears the conversation, /exit quits, Ctrl-C stops an answer"


def _colour(code: str) -> str:
    return f"\033[{code}m" if sys.stdout.isatty() else ""


USER, BOT, DIM, RESET = _colour("1;32"), _colour("36"), _colour("2"), _colour("0")


def fit_history(history: list[dict], tokenizer, budget: int) -> list[int]:
    """Prompt ids for the history, dropping the oldest exchanges until it fits `budget` tokens."""
    while True:
        ids = encode_dialog(history, tokenizer)
        first = 1 if history[0]["role"] == "system" else 0
        if len(ids) <= budget or len(history) - first <= 1:
            return ids
        del history[first:first + 2]


def ask(engine: Engine, ids: list[int], params: SamplingParams, max_new: int) -> str:
    """Stream one answer to stdout; Ctrl-C (wherever it lands) cancels it. Returns the text produced."""
    events: queue.Queue[dict] = queue.Queue()
    req = Request(ids, params, max_new, on_event=events.put)
    engine.submit(req)
    text = []
    while True:
        try:
            e = events.get()
            if e["type"] == "token":
                text.append(e["text"])
                print(e["text"], end="", flush=True)
                continue
        except KeyboardInterrupt:
            req.cancel()
            print(f"{RESET}{DIM} [stopped]{RESET}", flush=True)
            continue
        if e["type"] == "error":
            print(f"\n[error: {e['message']}]", flush=True)
        return "".join(text)


def run_requests(engine: Engine, requests: list[Request]) -> list[list[dict]]:
    """Rank 0: submit requests to an engine that is not running, run it until each has had its final event ("done"
    or "error"), then stop it (it may run again). Returns each request's events, in order."""
    engine.stopping.clear()
    loop = threading.Thread(target=engine.run, name="engine", daemon=True)
    loop.start()
    events: list[list[dict]] = [[] for _ in requests]
    ended: queue.Queue = queue.Queue()

    def listen(i: int):
        def on_event(event: dict) -> None:
            events[i].append(event)
            if event["type"] in ("done", "error"):
                ended.put(i)
        return on_event

    for i, r in enumerate(requests):
        r.on_event = listen(i)
        engine.submit(r)
    for _ in requests:
        ended.get()
    engine.stopping.set()
    loop.join()
    return events


def answers(llama: Llama, prompts: list[list[int]], params: SamplingParams, max_gen_len: int,
            seed: int | None = None) -> list[str] | None:
    """Each prompt's answer, all of them batched by the engine as the server batches requests (each sampled with
    its own generator, seeded by `seed`): the texts on rank 0; the other ranks follow the engine and get None."""
    engine = Engine(llama, max_batch=len(prompts))
    if not llama.is_driver:
        engine.run()
        return None
    events = run_requests(engine, [Request(ids, params, max_gen_len, on_event=lambda e: None, seed=seed)
                                   for ids in prompts])
    errors = [e[-1]["message"] for e in events if e[-1]["type"] == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} answer(s) failed: {errors[0]}")
    return ["".join(e["text"] for e in request if e["type"] == "token") for request in events]


def repl(llama: Llama, system: str | None, raw: bool, params: SamplingParams, max_gen_len: int) -> None:
    """Rank 0's side: the engine loop runs in a thread while the main thread talks to the user."""
    engine = Engine(llama, max_batch=1)
    loop = threading.Thread(target=engine.run, name="engine", daemon=True)
    loop.start()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print(f"{DIM}{'Enter a prompt to complete' if raw else 'Chat with the model'}; {COMMANDS}.{RESET}")
    try:
        while True:
            try:
                line = input(f"{USER}{'Enter prompt: ' if raw else '> '}{RESET}")
            except KeyboardInterrupt:
                print()
                continue
            except EOFError:
                break
            if line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                history = history[:1] if system else []
                print(f"{DIM}(conversation cleared){RESET}")
                continue
            if not line.strip():
                continue
            budget = llama.model.n_ctx - max_gen_len
            try:
                if raw:
                    ids = llama.tokenizer.encode(line, bos=True)[-budget:]
                else:
                    history.append({"role": "user", "content": line})
                    ids = fit_history(history, llama.tokenizer, budget)
            except KeyboardInterrupt:  # Ctrl-C before the answer started: drop this turn
                if not raw and history and history[-1]["role"] == "user":
                    history.pop()
                print(f"{RESET}{DIM} [stopped]{RESET}")
                continue
            print(BOT, end="")
            answer = ask(engine, ids, params, max_gen_len)
            print(RESET)
            if not raw:
                history.append({"role": "assistant", "content": answer})
    finally:
        engine.stopping.set()
        loop.join()


def interactive(load: LoadConfig, parallel: ParallelConfig, system: str | None = None, raw: bool = False,
                params: SamplingParams = SamplingParams.meta(0.7, 0.95),
                max_gen_len: int = 512) -> None:
    """The chat on rank 0's terminal; other ranks follow the engine. An answer takes at most half the context."""
    llama = Llama.from_config(load, parallel)
    if llama.is_driver:
        repl(llama, system, raw, params, min(max_gen_len, load.n_ctx // 2))
    else:
        Engine(llama, max_batch=1).run()
