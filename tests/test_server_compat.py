"""What clients of llama.cpp's server and of OpenAI-compatible servers rely on, asked of `llama-dist serve` with
the bundled SmolLM2 (default flags): paths with and without /v1, any model name, /props, /slots,
/apply-template, /tokenize pieces, several prompts at once, text parts, log-probabilities, context limits,
llama.cpp's result fields, CORS and /metrics."""
import base64
import json
import concurrent.futures
import math
import struct
import time

import httpx
import pytest

from .test_server import Server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    s = Server("--model", "smollm2", "--max_batch", "4", "--n_ctx", "128", "--api_key", "k")
    yield s
    assert s.stop() == [0]


def auth() -> dict:
    return {"Authorization": "Bearer k"}


def client(server, v1: bool = True) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + ("/v1" if v1 else ""), api_key="k")


def test_paths_without_v1_and_any_model_name_are_served(server):
    """OpenAI clients configured without /v1, or with another model's name, get this model's answer."""
    for v1 in (True, False):
        c = client(server, v1)
        assert [m.id for m in c.models.list().data] == ["smollm2"]
        chat = c.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0)
        assert chat.model == "gpt-3.5-turbo" and chat.choices[0].message.content
        assert chat.system_fingerprint
    text = client(server).completions.create(model="davinci-002", prompt="The capital of France is", max_tokens=3,
                                             temperature=0)
    assert text.model == "davinci-002" and text.usage.completion_tokens == 3


def test_props_slots_and_apply_template(server):
    props = httpx.get(f"{server.url}/props", headers=auth()).json()
    assert props["total_slots"] == 4 and props["model_path"].endswith(".gguf")
    assert props["default_generation_settings"]["n_ctx"] == 128 and "im_start" in props["chat_template"]
    slots = httpx.get(f"{server.url}/slots", headers=auth()).json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3] and not any(s["is_processing"] for s in slots)
    assert all(s["n_ctx"] == 128 for s in slots)
    counted = server.post("/chat/completions/input_tokens", {"messages": [{"role": "user", "content": "Hi"}]},
                          headers=auth()).json()["input_tokens"]
    chat = client(server).chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=1)
    assert counted == chat.usage.prompt_tokens
    r = server.post("/apply-template", {"messages": [{"role": "user", "content": "Hi"}]}, headers=auth())
    assert r.json()["prompt"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenize_with_pieces(server):
    r = server.post("/tokenize", {"content": "Hello naïve 中", "with_pieces": True}, headers=auth()).json()
    assert "".join(t["piece"] for t in r["tokens"]) == "Hello naïve 中"
    plain = server.post("/tokenize", {"content": "Hello naïve 中"}, headers=auth()).json()["tokens"]
    assert [t["id"] for t in r["tokens"]] == plain


def test_several_prompts_give_one_result_each_in_order(server):
    """A list of prompts (text, or token-id lists) in one /completion: each result equals the prompt alone."""
    prompts = ["The capital of France is", "Water boils at", "1, 2, 3,"]
    alone = [_greedy_auth(server, p, 6) for p in prompts]
    ids = [server.post("/tokenize", {"content": p}, headers=auth()).json()["tokens"] for p in prompts]
    mixed = [ids[0], prompts[1], {"prompt_string": prompts[2]}]  # token ids, text, llama.cpp's JSON prompt
    for batch in (prompts, ids, mixed):
        results = server.post("/completion", {"prompt": batch, "n_predict": 6, "temperature": 0},
                              headers=auth()).json()
        assert [r["index"] for r in results] == [0, 1, 2]
        assert [r["tokens"] for r in results] == alone
    one = server.post("/completion", {"prompt": {"prompt_string": prompts[0]}, "n_predict": 6, "temperature": 0},
                      headers=auth()).json()
    assert one["tokens"] == alone[0]
    many = client(server).completions.create(model="x", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 18


def _greedy_auth(server, prompt: str, n: int) -> list[int]:
    r = server.post("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0}, headers=auth())
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_chat_content_as_text_parts(server):
    c = client(server)
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    as_parts = c.chat.completions.create(model="x", messages=[{"role": "user", "content": parts}], max_tokens=8,
                                         temperature=0)
    joined = c.chat.completions.create(model="x", temperature=0, max_tokens=8,
                                       messages=[{"role": "user", "content": "What is the capital\nof France?"}])
    assert as_parts.choices[0].message.content == joined.choices[0].message.content


def test_any_message_order_and_assistant_prefill(server):
    """Messages in any order are laid out by the template; a final assistant message is continued, not answered
    (llama.cpp's prefill): the prompt stops right after its text and the answer carries on from there."""
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}] * 3
    assert c.chat.completions.create(model="x", messages=messages, max_tokens=3).choices[0].message.content
    prefill = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is"}]
    prompt = server.post("/apply-template", {"messages": prefill}, headers=auth()).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\nThe capital of France is")
    answer = c.chat.completions.create(model="x", messages=prefill, max_tokens=4, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    assert not answer.choices[0].message.content.startswith("The capital")
    # vLLM's switches: continue_final_message false answers after it instead; both it and add_generation_prompt: 400
    closed = server.post("/apply-template", {"messages": prefill, "continue_final_message": False},
                         headers=auth()).json()["prompt"]
    assert closed.endswith("The capital of France is<|im_end|>\n<|im_start|>assistant\n")
    for body in ({"add_generation_prompt": True, "continue_final_message": True},
                 {"messages": prefill + [{"role": "assistant", "content": "Paris"}]}):
        r = server.post("/v1/chat/completions", {"messages": prefill, "max_tokens": 2, **body}, headers=auth())
        assert r.status_code == 400, body
    # llama.cpp's "verbose": what the model read, as text
    verbose = server.post("/v1/chat/completions", {"messages": prefill, "max_tokens": 2, "verbose": True},
                          headers=auth()).json()["__verbose"]
    assert verbose["prompt"] == prompt and len(verbose["tokens"]) == 2


def test_openai_stream_usage_carries_timings(server):
    body = {"messages": [{"role": "user", "content": "test"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, "timings_per_token": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "timings" not in chunks[0] and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = [c for c in chunks if not c["choices"]]
    assert len(usage) == 1 and usage[0]["timings"]["predicted_n"] == usage[0]["usage"]["completion_tokens"] <= 5
    assert all("timings" in c for c in chunks[1:])


def test_logprobs_chat_completions_and_n_probs(server):
    c = client(server)
    chat = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say yes."}], max_tokens=5,
                                     temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == len(content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:  # greedy: the chosen token is the likeliest, and the top list is sorted
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    text = c.completions.create(model="x", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == text.choices[0].text and lp.text_offset[0] == 0
    r = server.post("/completion", {"prompt": "The capital of France is", "n_predict": 3, "temperature": 0,
                                    "n_probs": 2}, headers=auth()).json()
    probs = r["completion_probabilities"]
    assert [p["id"] for p in probs] == r["tokens"] and all(len(p["top_logprobs"]) == 2 for p in probs)
    assert sum(math.exp(p["logprob"]) for p in probs[0]["top_logprobs"]) <= 1.0 + 1e-6


def test_context_limits_as_llama_cpp(server):
    """n_predict past the context is capped (truncated: true when the context filled); -1 runs to the end of
    the context; max_tokens 0 reads the prompt only; a prompt that does not fit is refused, saying so."""
    prompt = "Once upon a time"
    n_prompt = len(server.post("/tokenize", {"content": prompt, "add_special": True}, headers=auth()).json()["tokens"])
    body = {"prompt": prompt, "temperature": 0, "ignore_eos": True}
    capped = server.post("/completion", {**body, "n_predict": 10_000}, headers=auth()).json()
    assert capped["stop_type"] == "limit" and capped["truncated"] and capped["tokens_predicted"] == 128 - n_prompt
    until_full = server.post("/completion", {**body, "n_predict": -1}, headers=auth()).json()
    assert until_full["tokens"] == capped["tokens"]
    short = server.post("/completion", {**body, "n_predict": 4}, headers=auth()).json()
    assert short["truncated"] is False and short["timings"]["predicted_n"] == 4
    none = server.post("/completion", {**body, "n_predict": 0}, headers=auth()).json()
    assert none["content"] == "" and none["tokens_predicted"] == 0 and none["tokens_evaluated"] == n_prompt
    zero = client(server).completions.create(model="x", prompt=prompt, max_tokens=0)
    assert zero.choices[0].text == "" and zero.usage.completion_tokens == 0
    r = server.post("/completion", {"prompt": "word " * 200}, headers=auth())
    assert r.status_code == 400 and "exceeds the available context size" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "exceed_context_size_error"


def test_llama_cpp_result_fields(server):
    """generation_settings, has_new_line, truncated, timings (with timings_per_token, in each streamed event too),
    response_fields, return_tokens."""
    r = server.post("/completion", {"prompt": "The capital of France is", "n_predict": 4, "temperature": 0,
                                    "seed": 7}, headers=auth()).json()
    assert r["generation_settings"]["n_predict"] == 4 and r["generation_settings"]["seed"] == 7
    assert r["has_new_line"] == ("\n" in r["content"]) and r["truncated"] is False
    assert r["timings"]["predicted_n"] == len(r["tokens"]) == r["tokens_predicted"]
    fields = server.post("/completion", {"prompt": "Hi", "n_predict": 2, "temperature": 0,
                                         "response_fields": ["content", "generation_settings/n_predict"]},
                         headers=auth()).json()
    assert set(fields) == {"content", "generation_settings/n_predict"} and fields["generation_settings/n_predict"] == 2
    no_tokens = server.post("/completion", {"prompt": "Hi", "n_predict": 2, "return_tokens": False},
                            headers=auth()).json()
    assert no_tokens["tokens"] == []
    body = {"prompt": "Once upon a time", "n_predict": 6, "temperature": 0, "stream": True, "timings_per_token": True}
    with httpx.stream("POST", f"{server.url}/completion", json=body, headers=auth(), timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    counts = [e["timings"]["predicted_n"] for e in events if not e["stop"]]
    assert counts == sorted(counts) and counts[-1] <= 6 and all(e["timings"]["prompt_n"] > 0 for e in events)


def test_embeddings_through_the_openai_client(server):
    """One unit-length vector of the model's width per input; the same text gives the same vector, alone or in a
    list, as text or as its token ids, with or without /v1, and base64 carries the same floats."""
    c = client(server)
    texts = ["The cat sat on the mat.", "Quarterly earnings rose by five percent."]
    both = c.embeddings.create(model="text-embedding-3-small", input=texts)
    assert [d.index for d in both.data] == [0, 1] and both.model == "text-embedding-3-small"
    vectors = [d.embedding for d in both.data]
    assert all(len(v) == 576 and abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)
    one = client(server, v1=False).embeddings.create(model="x", input=texts[0]).data[0].embedding
    assert max(abs(a - b) for a, b in zip(one, vectors[0])) < 1e-5
    ids = server.post("/tokenize", {"content": texts[1], "add_special": True}, headers=auth()).json()["tokens"]
    by_ids = c.embeddings.create(model="x", input=ids).data[0].embedding
    assert max(abs(a - b) for a, b in zip(by_ids, vectors[1])) < 1e-5
    assert both.usage.prompt_tokens == both.usage.total_tokens > len(ids)
    packed = server.post("/v1/embeddings", {"input": texts[0], "encoding_format": "base64"}, headers=auth()).json()
    floats = struct.unpack("<576f", base64.b64decode(packed["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(floats, one)) < 1e-6
    assert server.post("/v1/embeddings", {"input": ""}, headers=auth()).status_code == 400


def test_cors_preflight_and_header(server):
    """A browser page on another origin may call us (llama.cpp's policy: the origin named back, credentials
    allowed): the preflight needs no key, answers carry the header."""
    pre = httpx.options(f"{server.url}/v1/chat/completions",
                        headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://elsewhere.example"
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert pre.headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
    assert pre.headers["access-control-allow-headers"] == "authorization,content-type"
    r = httpx.get(f"{server.url}/health", headers={"Origin": "http://elsewhere.example"})
    assert r.headers["access-control-allow-origin"] == "http://elsewhere.example"
    assert "access-control-allow-origin" not in httpx.get(f"{server.url}/health").headers  # no Origin: no CORS


def test_api_key_as_anthropic_clients_send_it(server):
    assert httpx.get(f"{server.url}/v1/models", headers={"x-api-key": "k"}).status_code == 200
    for headers in ({"x-api-key": "wrong"}, {"Authorization": "k"}, {}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_post_sampling_probabilities_and_the_prompt_echoed(server):
    """llama.cpp's post_sampling_probs: each token's probability after the sampler's settings (top-k 3 here: at
    most three candidates, none of probability 0, summing to 1 when fewer than asked), and the prompt as text."""
    body = {"prompt": "Today was the day. Today I would finally become a", "n_probs": 5, "temperature": 1.0,
            "top_k": 3, "n_predict": 4, "seed": 3, "post_sampling_probs": True}
    r = server.post("/completion", body, headers=auth()).json()
    assert len(r["completion_probabilities"]) == len(r["tokens"]) == 4
    for token, entry in zip(r["tokens"], r["completion_probabilities"]):
        top = entry["top_probs"]
        assert entry["id"] == token and 0 < entry["prob"] <= 1 and 1 <= len(top) <= 3
        assert all(p["prob"] > 0 for p in top) and math.isclose(sum(p["prob"] for p in top), 1, rel_tol=1e-4)
        assert entry["prob"] == next(p["prob"] for p in top if p["id"] == token)
    assert r["prompt"] == body["prompt"]
    greedy = server.post("/completion", {**body, "temperature": 0, "n_predict": 1}, headers=auth()).json()
    assert [p["prob"] for p in greedy["completion_probabilities"][0]["top_probs"]] == [1.0]


def test_prompt_progress_while_a_prompt_is_read():
    """return_progress on streams: a first report before anything is read (what the cache held), then one per
    prompt chunk read (--prefill_chunk 16 here), on llama.cpp's /completion and OpenAI's chat stream; a prompt
    already in the cache reports it."""
    s = Server("--model", "smollm2", "--max_batch", "1", "--n_ctx", "256", "--prefill_chunk", "16")
    try:
        prompt = "This is a test. " * 12
        body = {"prompt": prompt, "n_predict": 2, "stream": True, "return_progress": True}
        with httpx.stream("POST", f"{s.url}/completion", json=body, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        progress = [e["prompt_progress"] for e in events if "prompt_progress" in e]
        n = progress[0]["total"]
        assert [p["processed"] for p in progress] == [0, *range(16, n, 16), n] and n > 40
        assert all(p["cache"] == 0 and p["total"] == n for p in progress) and events[-1]["stop"]
        chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2, "stream": True,
                "return_progress": True}
        for _ in range(2):  # the second time the chat's prompt is in the cache
            with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=chat, timeout=60) as r:
                lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            progress = [json.loads(x)["prompt_progress"] for x in lines[:-1] if "prompt_progress" in json.loads(x)]
            first, last = progress[0], progress[-1]
            assert first["cache"] == first["processed"] and last["processed"] == last["total"] == first["total"]
        assert progress[0]["cache"] >= 16 and len(progress) < 4
        assert "prompt_progress" not in s.post("/completion", {**body, "stream": False}).json()
    finally:
        assert s.stop() == [0]


def test_aliases_tags_no_ui_and_several_addresses():
    """llama.cpp's --alias a,b,c and --tags in /models (the id: the first alias in sorted order), --no-ui (no page
    at /), a host list (each address answers), and --cors_origins localhost (pages on this machine only)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        host = "127.0.0.1,::1"
    except OSError:
        host = "127.0.0.1"
    s = Server("--model", "smollm2", "--max_batch", "1", "--n_ctx", "64", "--host", host, "--alias", "tiny,fim,code",
               "--tags", "chat,small", "--noui", "--cors_origins", "localhost")
    try:
        model = httpx.get(f"{s.url}/v1/models").json()["data"][0]
        assert model["id"] == "code" and set(model["aliases"]) == {"tiny", "fim", "code"}
        assert set(model["tags"]) == {"chat", "small"}
        assert httpx.get(f"{s.url}/").status_code == 404
        if "::1" in host:
            assert httpx.get(f"http://[::1]:{s.port}/health").status_code == 200
        for origin, allowed in (("http://localhost:3000", True), ("http://[::1]", True), ("http://evil.com", False),
                                ("http://localhost.evil.com", False)):
            pre = httpx.options(f"{s.url}/completion", headers={"Origin": origin,
                                                               "Access-Control-Request-Method": "POST"})
            assert pre.status_code == 200
            assert pre.headers.get("access-control-allow-origin") == (origin if allowed else None)
    finally:
        assert s.stop() == [0]


def test_metrics_count_what_clients_sent(server):
    def value(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    before = httpx.get(f"{server.url}/metrics", headers=auth()).text
    prompts = ["Roses are red,", "The sun rises in the", "def add(a, b):", "Dear Sir or Madam,"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: server.post("/completion", {"prompt": p, "n_predict": 5, "temperature": 0},
                                                      headers=auth()).json(), prompts))
    after = httpx.get(f"{server.url}/metrics", headers=auth()).text
    assert value(after, "llamadist_requests_total") - value(before, "llamadist_requests_total") == 4
    generated = sum(a["tokens_predicted"] for a in answers)
    assert value(after, "llamadist_tokens_predicted_total") - value(before, "llamadist_tokens_predicted_total") == \
        generated
    prompt_tokens = sum(a["tokens_evaluated"] for a in answers)
    assert value(after, "llamadist_prompt_tokens_total") - value(before, "llamadist_prompt_tokens_total") == \
        prompt_tokens
    assert value(after, "llamadist_time_to_first_token_seconds_count") - \
        value(before, "llamadist_time_to_first_token_seconds_count") == 4
    assert "llamadist_kv_cache_usage_ratio" in after and "llamadist_requests_deferred" in after
    # per step: each request's first token comes from its prompt's last chunk, every later one from a decode row
    assert value(after, "llamadist_step_prompt_tokens_sum") - value(before, "llamadist_step_prompt_tokens_sum") == \
        prompt_tokens
    assert value(after, "llamadist_step_decode_rows_sum") - value(before, "llamadist_step_decode_rows_sum") == \
        generated - len(prompts)
    steps = value(after, "llamadist_step_decode_rows_count") - value(before, "llamadist_step_decode_rows_count")
    assert max(a["tokens_predicted"] for a in answers) <= steps <= generated + prompt_tokens
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # the key guards it like the rest


def test_no_slots_answers_501():
    s = Server("--model", "smollm2", "--max_batch", "1", "--n_ctx", "64", "--noslots")
    try:
        r = httpx.get(f"{s.url}/slots")
        assert r.status_code == 501 and "error" in r.json()
    finally:
        assert s.stop() == [0]



LONG_TEXT = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore "
             "magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea "
             "commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat "
             "nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit "
             "anim id est laborum. ") * 2


def test_context_shift_cuts_long_prompts_and_goes_on_past_a_full_context():
    """llama.cpp's --context-shift: a prompt over the context keeps whole blocks of its end; when the context
    fills, half of it is dropped and the answer goes on exactly as a fresh request on what was kept would."""
    s = Server("--model", "smollm2", "--max_batch", "2", "--n_ctx", "128", "--context_shift")
    try:
        ids = s.post("/tokenize", {"content": LONG_TEXT, "add_special": True}).json()["tokens"]
        assert len(ids) > 128
        block = 128 // 2
        kept = ids[((len(ids) - block) // block) * block:]  # n_keep 0: whole blocks of 64 erased from the front
        r = s.post("/completion", {"prompt": LONG_TEXT, "n_predict": 64, "temperature": 0, "ignore_eos": True}).json()
        assert r["truncated"] is True and r["timings"]["prompt_n"] == len(kept) and r["tokens_predicted"] == 64
        full = kept + r["tokens"]
        first_shift = 128 - len(kept)  # tokens generated when the context first fills
        assert 0 < first_shift < 64
        fresh = s.post("/completion", {"prompt": full[block:128], "n_predict": 64 - first_shift, "temperature": 0,
                                       "ignore_eos": True}).json()
        assert fresh["tokens"] == r["tokens"][first_shift:]
        short = s.post("/completion", {"prompt": "Hi", "n_predict": 8, "temperature": 0}).json()
        assert short["truncated"] is False
    finally:
        assert s.stop() == [0]


def test_logit_bias_n_choices_and_server_seed():
    """logit_bias as llama.cpp's pairs (ids or text) and OpenAI's map bans tokens; n gives that many choices;
    --seed seeds requests that bring none (llama.cpp's generation_settings and /props show it)."""
    s = Server("--model", "smollm2", "--max_batch", "4", "--n_ctx", "128", "--seed", "42")
    try:
        body = {"prompt": "The capital of France is", "n_predict": 1, "temperature": 0}
        first = s.post("/completion", body).json()
        banned = first["tokens"][0]
        for bias in ([[banned, False]], {str(banned): -100}, [[first["content"], -100]]):
            again = s.post("/completion", {**body, "logit_bias": bias}).json()
            assert again["tokens"][0] != banned, bias
        assert s.post("/completion", {**body, "logit_bias": "no"}).status_code == 400
        everything = s.post("/completion", {**body, "logit_bias": [[t, False] for t in range(49152)]})
        assert everything.status_code == 400 and "bans every token" in everything.json()["error"]["message"]
        # OpenAI's penalties, llama.cpp's way (over repeat_last_n tokens), shown in generation_settings
        long = {**body, "n_predict": 24}
        plain = s.post("/completion", long).json()
        present = s.post("/completion", {**long, "presence_penalty": 2, "frequency_penalty": 1.5,
                                         "repeat_last_n": -1}).json()
        assert present["tokens"] != plain["tokens"]
        assert present["generation_settings"]["presence_penalty"] == 2 and present["generation_settings"][
            "repeat_last_n"] == -1
        assert s.post("/completion", {**body, "frequency_penalty": 3}).status_code == 400
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused")
        many = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Name a colour."}], n=3,
                                         max_tokens=6, temperature=1.0, seed=5)
        assert [ch.index for ch in many.choices] == [0, 1, 2] and many.usage.completion_tokens > 3
        assert len({ch.message.content for ch in many.choices}) > 1  # seeds 5, 6, 7
        sampled = {**body, "temperature": 1.0, "n_predict": 8}
        a, b = s.post("/completion", sampled).json(), s.post("/completion", sampled).json()
        assert a["generation_settings"]["seed"] == 42 and a["tokens"] == b["tokens"]
        assert httpx.get(f"{s.url}/props").json()["default_generation_settings"]["params"]["seed"] == 42
        image = s.post("/completion", {"prompt": [{"prompt_string": "x", "multimodal_data": ["aGk="]}]})
        assert image.status_code == 400 and "text only" in image.json()["error"]["message"]
    finally:
        assert s.stop() == [0]


def test_a_client_that_leaves_frees_its_slot(server):
    """A non-streamed request whose client goes away is cancelled (as a streamed one is), not run to its end."""
    def cancelled() -> float:
        text = httpx.get(f"{server.url}/metrics", headers=auth()).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('llamadist_requests_total{stop_type="cancelled"}'))

    before = cancelled()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/completion", headers=auth(), timeout=0.5,
                   json={"prompt": "Once upon a time", "n_predict": -1, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while any(s["is_processing"] for s in httpx.get(f"{server.url}/slots", headers=auth()).json()):
        assert time.monotonic() < deadline, "the abandoned request still holds its slot"
        time.sleep(0.2)
    assert cancelled() == before + 1
