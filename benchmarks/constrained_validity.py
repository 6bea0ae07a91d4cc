"""How many JSON-schema-constrained answers sampled at temperature 1 parse and validate, through the server on
one rank and on three tensor-parallel Gloo ranks (issue 22's target: all of 200 on each). The samples are
tests/test_constrained_output.py's (three schemas; OpenAI's response_format and llama.cpp's json_schema).

    python benchmarks/constrained_validity.py [--n 200] [--worlds 1,3]
"""
from __future__ import annotations

import concurrent.futures
import json
import sys
import time
from pathlib import Path

import fire
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_constrained_output import _sample  # noqa: E402
from tests.test_server import Server  # noqa: E402


def valid(schema: dict, text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False


def main(n: int = 200, worlds: tuple[int, ...] = (1, 3)) -> None:
    for world in (worlds,) if isinstance(worlds, int) else worlds:
        server = Server("--model", "smollm2", "--max_batch", "8", "--n_ctx", "256", world=world)
        try:
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda i: _sample(server, i), range(n)))
            good = sum(valid(schema, text) for schema, text in results)
            seconds = round(time.perf_counter() - start, 1)
            print(json.dumps({"ranks": world, "samples": n, "valid": good, "seconds": seconds}), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    fire.Fire(main)
