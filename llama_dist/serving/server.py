"""`llama-dist serve`: rank 0 listens (HTTP in a thread), every rank runs the engine loop in its main thread."""
from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from pathlib import Path

from ..checkpoint.bundled import resolve_model
from ..checkpoint.config import LoadConfig
from ..distributed.context import init_distributed
from ..distributed.layout import ParallelConfig
from ..generation.llama import Llama
from .api import State, build_app
from .engine import Engine, check_overlap


def model_name(model: str) -> str:
    return Path(model).stem if model not in ("smollm2",) else "smollm2"


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to each of host's comma-separated addresses (IPv4 or IPv6) at port. Each says it is TCP
    (create_server leaves its protocol 0), so asyncio turns Nagle's algorithm off on its connections: with it on,
    a response's body waits for the client to acknowledge its headers, up to 40 ms on every request after a
    connection's first."""
    sockets = []
    try:
        for address in host.split(","):
            address = address.strip().strip("[]")
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            listener = socket.create_server((address, port), family=family)
            sockets.append(socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=listener.detach()))
    except OSError as e:
        for s in sockets:
            s.close()
        raise RuntimeError(f"Could not listen on {address}:{port} ({e.strerror}; is another server using the "
                           "port?). Choose another port or address.") from None
    return sockets


def urls(host: str, port: int) -> str:
    return ", ".join(f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}"
                     for a in (h.strip().strip("[]") for h in host.split(",")))


def start_http(state: State, host: str, port: int):
    """uvicorn on its own thread and event loop, listening on each of host's addresses; returns its Server (set
    should_exit to stop it) and thread."""
    import uvicorn

    sockets = listen(host, port)  # fail now, before loading the model, if an address cannot be had
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=sockets)), name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"The HTTP server did not start on {urls(host, port)}.")
        time.sleep(0.05)
    return server, thread


def serve(load: LoadConfig, parallel: ParallelConfig, host: str = "127.0.0.1", port: int = 8080,
          max_queue: int = 64, api_key: str | None = None, slots: bool = True, context_shift: bool = False,
          alias: str | None = None, n_predict: int = -1, seed: int | None = None,
          temperature: float | None = None, prefill_chunk: int = 256, tags: str | None = None,
          cors_origins: str = "*", ui: bool = True, overlap: bool | None = None) -> None:
    """Serve the model over HTTP (llama.cpp and OpenAI APIs) with continuous batching across all ranks
    (every pipeline stage follows the driver's step plan like a tensor-parallel rank does): up to
    load.max_batch_size sequences of load.n_ctx tokens at once, max_queue more waiting. host: addresses,
    comma-separated; alias and tags: comma-separated names (the model's id is the first alias in sorted order,
    as llama.cpp's); cors_origins: "*", "localhost" or origins, comma-separated (serving/cors.py); overlap: the
    engine's (serving/engine.py; None: on GPUs)."""
    check_overlap(overlap, parallel.pp > 1)  # before loading
    pctx = init_distributed(parallel.backend, parallel.device, pp=parallel.pp)
    aliases = tuple(sorted({a.strip() for a in (alias or "").split(",") if a.strip()}))
    state = State(aliases[0] if aliases else model_name(load.model), api_key, model_path=resolve_model(load.model),
                  slots_endpoint=slots, context_shift=context_shift, n_predict=n_predict, seed=seed,
                  temperature=temperature, aliases=aliases,
                  tags=tuple(t.strip() for t in (tags or "").split(",") if t.strip()),
                  cors_origins=tuple(o.strip() for o in cors_origins.split(",") if o.strip()), ui=ui)
    http = None
    if pctx.is_driver:  # answer /health with 503 while the model loads
        http, thread = start_http(state, host, port)
    llama = Llama.from_config(load, parallel, ctx=pctx)
    engine = Engine(llama, load.max_batch_size, max_queue, prefill_chunk, overlap=overlap)

    def stop(signum, frame):  # SIGTERM/SIGINT: cancel in-flight work, then every rank leaves the loop
        engine.stopping.set()

    if pctx.is_driver:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        state.engine = engine
        print(f"Serving {state.model_name} on {urls(host, port)} ({pctx.world_size} rank(s), "
              f"batch {load.max_batch_size}, context {load.n_ctx})", flush=True)
    else:  # followers leave when rank 0's plan says so
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine.run()
    if http is not None:
        http.should_exit = True
        thread.join(timeout=5)
