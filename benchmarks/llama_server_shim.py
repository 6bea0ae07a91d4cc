#!/usr/bin/env python3
"""llama-server's command line mapped onto `llama-dist serve --model smollm2`: the launch adapter for running
llama.cpp's own server tests against us (benchmarks/RESULTS.md has the figures).

    . .venv/bin/activate   # the python on PATH runs the server
    cd <llama.cpp>/tools/server/tests
    LLAMA_SERVER_BIN_PATH=<this file> python -m pytest -q unit/test_basic.py unit/test_tokenize.py \\
        unit/test_security.py unit/test_ctx_shift.py unit/test_completion.py unit/test_chat_completion.py

llama.cpp's --ctx-size is shared by its --parallel slots (each gets ctx-size / parallel, or all of it with
--kv-unified); ours is per slot. Flags of features we do not have (model downloads, GPU layers, threads,
templates by name, speculative decoding, ...) are dropped: the bundled model is served whatever is asked.
"""
import os
import sys
from pathlib import Path

VALUED = {"--port": "--port", "--host": "--host", "--api-key": "--api_key", "--alias": "--alias",
          "--n-predict": "--n_predict", "--seed": "--seed", "--temp": "--temperature", "--tags": "--tags",
          "--cors-origins": "--cors_origins", "--batch-size": "--prefill_chunk"}
SWITCHES = {"--no-slots": "--noslots", "--context-shift": "--context_shift", "--no-ui": "--noui"}
DROPPED_SWITCHES = {"--offline", "--cont-batching", "--embedding", "--metrics", "--slots", "--jinja", "--no-jinja",
                    "--verbose", "--reranking", "--swa-full", "--no-models-autoload", "--no-mmproj",
                    "--no-cache-idle-slots", "--ui-mcp-proxy", "--backend_sampling"}


def main(args: list[str]) -> None:
    out, ctx, parallel, unified, i = [], 4096, 1, False, 0
    while i < len(args):
        flag, value = args[i], args[i + 1] if i + 1 < len(args) else None
        if flag in VALUED:
            out += [VALUED[flag], value]
        elif flag in SWITCHES:
            out.append(SWITCHES[flag])
        elif flag == "--ctx-size":
            ctx = int(value)
        elif flag == "--parallel":
            parallel = int(value)
        elif flag == "--kv-unified":
            unified = True
        i += 1 if flag in SWITCHES or flag in DROPPED_SWITCHES or flag == "--kv-unified" else 2
    n_ctx = ctx if unified else ctx // parallel
    os.chdir(Path(__file__).resolve().parents[1])
    os.execv(sys.executable, [sys.executable, "-m", "llama_dist.cli", "serve", "--model", "smollm2",
                              "--max_batch", str(parallel), "--n_ctx", str(n_ctx), *out])


if __name__ == "__main__":
    main(sys.argv[1:])
