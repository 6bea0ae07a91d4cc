"""`llama-dist serve`: rank 0 listens (HTTP in a thread), every rank runs the engine loop in its main thread."""
from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

from ..checkpoint.bundled import resolve_model
from ..checkpoint.config import LoadConfig
from ..distributed.context import init_distributed
from ..distributed.layout import ParallelConfig
from ..generation.llama import Llama
from .api import State, build_app
from .engine import Engine


def model_name(model: str) -> str:
    return Path(model).stem if model not in ("smollm2",) else "smollm2"


def start_http(state: State, host: str, port: int):
    """uvicorn on its own thread and event loop; returns its Server (set should_exit to stop it)."""
    import uvicorn

    config = uvicorn.Config(build_app(state), host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # fail now, before loading the model, if the port cannot be had
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"Could not listen on {host}:{port} (is another server using the port?). "
                               "Choose another port.")
        time.sleep(0.05)
    return server, thread


def serve(load: LoadConfig, parallel: ParallelConfig, host: str = "127.0.0.1", port: int = 8080,
          max_queue: int = 64, api_key: str | None = None, slots: bool = True, context_shift: bool = False,
          alias: str | None = None, n_predict: int = -1, seed: int | None = None,
          temperature: float | None = None, prefill_chunk: int = 256) -> None:
    """Serve the model over HTTP (llama.cpp and OpenAI APIs) with continuous batching across all ranks
    (every pipeline stage follows the driver's step plan like a tensor-parallel rank does): up to
    load.max_batch_size sequences of load.n_ctx tokens at once, max_queue more waiting."""
    pctx = init_distributed(parallel.backend, parallel.device, pp=parallel.pp)
    state = State(alias or model_name(load.model), api_key, model_path=resolve_model(load.model),
                  slots_endpoint=slots, context_shift=context_shift, n_predict=n_predict, seed=seed,
                  temperature=temperature)
    http = None
    if pctx.is_driver:  # answer /health with 503 while the model loads
        http, thread = start_http(state, host, port)
    llama = Llama.from_config(load, parallel, ctx=pctx)
    engine = Engine(llama, load.max_batch_size, max_queue, prefill_chunk)

    def stop(signum, frame):  # SIGTERM/SIGINT: cancel in-flight work, then every rank leaves the loop
        engine.stopping.set()

    if pctx.is_driver:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        state.engine = engine
        print(f"Serving {state.model_name} on http://{host}:{port} ({pctx.world_size} rank(s), "
              f"batch {load.max_batch_size}, context {load.n_ctx})", flush=True)
    else:  # followers leave when rank 0's plan says so
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    engine.run()
    if http is not None:
        http.should_exit = True
        thread.join(timeout=5)
