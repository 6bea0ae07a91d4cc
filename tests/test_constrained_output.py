"""Constrained decoding through the server: JSON schemas (OpenAI's response_format and llama.cpp's json_schema)
and GBNF grammars, sampled at temperature 1 so that only the constraint keeps the output valid, on one rank and
on three tensor-parallel Gloo ranks (where rank 0 alone samples)."""
import concurrent.futures
import json

import jsonschema
import torch
import pytest

from .test_server import Server

openai = pytest.importorskip("openai")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "maxItems": 3}},
     "required": ["colour", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5},
]


def _sample(server: Server, i: int) -> tuple[dict, str]:
    schema = SCHEMAS[i % len(SCHEMAS)]
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    if i % 2:  # OpenAI's response_format through the client
        answer = c.chat.completions.create(
            model="x", temperature=1.0, max_tokens=120, seed=i,
            messages=[{"role": "user", "content": "Write some JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        return schema, answer.choices[0].message.content
    body = {"prompt": "JSON:", "temperature": 1.0, "n_predict": 120, "seed": i, "json_schema": schema}
    r = server.post("/completion", body)  # llama.cpp's field
    assert r.status_code == 200, r.text
    return schema, r.json()["content"]


def _check_all_valid(server: Server, n: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _sample(server, i), range(n)))
    for schema, text in results:
        jsonschema.validate(json.loads(text), schema)  # raises on any invalid output


@pytest.fixture(scope="module")
def server():
    s = Server("--model", "smollm2", "--max_batch", "8", "--n_ctx", "256")
    yield s
    assert s.stop() == [0]


def test_json_schema_outputs_all_validate(server):
    _check_all_valid(server, 24)


def test_json_object_and_gbnf_grammar(server):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    obj = c.chat.completions.create(model="x", temperature=0.0, max_tokens=200,
                                    messages=[{"role": "user", "content": "A JSON object, please."}],
                                    response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop"  # complete (greedy: a sampled answer may run past the limit)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    grammar = 'root ::= ("yes" | "no") " because " [a-z ]{1,20} "."'
    for seed in range(4):
        r = server.post("/completion", {"prompt": "Is the sky blue?", "temperature": 1.0, "n_predict": 40,
                                        "seed": seed, "grammar": grammar}).json()
        head, _, rest = r["content"].partition(" because ")
        assert head in ("yes", "no") and rest.endswith(".") and r["stop_type"] == "eos", r["content"]


@pytest.mark.parametrize("body, message", [
    ({"grammar": "root ::= ((("}, "does not parse as GBNF"),
    ({"grammar": 42}, "'grammar' must be a GBNF grammar"),
    ({"json_schema": "an object"}, "'json_schema' must be a JSON schema object"),
    ({"response_format": {"type": "xml"}}, "'response_format' must be"),
    ({"response_format": {"type": "json_object", "schema": 123}}, "must be an object"),
])
def test_bad_constraints_are_refused(server, body, message):
    r = server.post("/completion", {"prompt": "x", **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_json_schema_on_three_tensor_parallel_ranks():
    """Rank 0 samples and holds the constraint; the other ranks follow the tokens it chose."""
    s = Server("--model", "smollm2", "--max_batch", "4", "--n_ctx", "256", "--backend", "gloo", world=3)
    try:
        _check_all_valid(s, 9)
    finally:
        assert s.stop() == [0, 0, 0]


def test_json_whitespace_and_integers_are_bounded_as_llama_cpp_bounds_them():
    """Between JSON tokens: nothing, a space, or a newline and up to 20 spaces or tabs; an integer without bounds
    of its own has at most 16 digits. (Unbounded, answers sampled at temperature 1 ran to their limit in blank
    lines or digits.) Its own bounds are kept."""
    from llama_dist.generation.constraints import Constraint, json_schema_grammar
    from llama_dist.generation.llama import Llama

    tokenizer = Llama.build("smollm2", max_seq_len=32, max_batch_size=1).tokenizer
    vocab = tokenizer.n_words

    def allowed(schema: dict, text: str, following: str) -> bool:
        c = Constraint(json_schema_grammar(schema), tokenizer, vocab)
        for token in tokenizer.encode(text, bos=False):
            c.consume(token)
        (nxt,) = tokenizer.encode(following, bos=False)
        return bool(c.mask(torch.zeros(vocab))[nxt] == 0)

    numbers = {"type": "array", "items": {"type": "integer"}}
    assert allowed(numbers, "[" + "9" * 15, "9") and not allowed(numbers, "[" + "9" * 16, "9")
    assert allowed({"type": "array", "items": {"type": "integer", "maximum": 10 ** 20}}, "[" + "9" * 16, "9")
    assert allowed(numbers, "[1,", " ") and not allowed(numbers, "[1, ", " ")
    assert allowed(numbers, "[1,\n", "\t") and not allowed(numbers, "[1,\n" + " " * 20, " ")
