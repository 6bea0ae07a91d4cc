"""`llama-dist serve` over loopback: OpenAI client, llama.cpp fields, continuous batching, bad input, shutdown."""
import asyncio
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from llama_dist import Llama
from llama_dist.serving.server import listen

from .helpers import ROOT, free_port, start_ranks, streamed_tokens

openai = pytest.importorskip("openai")


class Server:
    def __init__(self, *args: str, world: int = 1, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["-m", "llama_dist.cli", "serve", "--port", str(self.port), *args]
        if world > 1:  # ranks started as torchrun starts its workers; SIGTERM goes to the driver, as from mpirun
            self.procs = start_ranks(world, argv)
        else:
            self.procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True,
                                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})]
        self.proc = self.procs[0]
        self.saw_loading = False
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in self.procs), self.proc.communicate()
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "loading"
                    self.saw_loading = True
                elif r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def post(self, path: str, body, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(f"{self.url}{path}", content=content, timeout=120, **kw)

    def stop(self) -> list[int]:
        """SIGTERM to the driver: in-flight work is cancelled and every rank exits."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return [p.wait(timeout=60) for p in self.procs]
        finally:
            for p in self.procs:
                p.kill()


@pytest.fixture(scope="module")
def server():
    s = Server("--model", "smollm2", "--quantize", "none", "--dtype", "float32", "--max_batch", "16", "--n_ctx", "512")
    yield s
    assert s.stop() == [0]


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_health_and_models(server):
    assert server.saw_loading  # /health answered 503 while the model loaded
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert [m.id for m in client(server).models.list().data] == ["smollm2"]


def test_openai_chat_and_completion(server):
    c = client(server)
    chat = c.chat.completions.create(model="smollm2", temperature=0, max_tokens=32,
                                     messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens > 0
    stream = c.chat.completions.create(model="smollm2", temperature=0, max_tokens=32, stream=True,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == chat.choices[0].message.content and len(pieces) > 3
    comp = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert comp.choices[0].text.startswith(" Paris") and comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 5
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert streamed == comp.choices[0].text


def test_echo_gives_the_prompt_and_its_log_probabilities(server):
    """OpenAI's echo with logprobs: the text starts with the prompt, and each prompt token after the first has the
    log-probability the model gives it after those before it (with max_tokens 0, the prompt's alone: scoring);
    with an answer, its entries follow; streamed, the prompt comes first."""
    prompt = "The capital of France is Paris. The capital of Italy is"
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}
    scored = server.post("/v1/completions", body).json()["choices"][0]
    assert scored["text"] == prompt and scored["finish_reason"] == "length"
    lp = scored["logprobs"]
    llama = Llama.build("smollm2", max_seq_len=64, max_batch_size=1, dtype="float32", quantize="none")
    ids = llama.tokenizer.encode(prompt, bos=True, eos=False)
    logp = torch.log_softmax(llama.runner.forward(torch.tensor([ids]), 0)[0], dim=-1)
    want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]).endswith(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], want)) < 1e-4
    assert all(len(top) == 2 and max(top.values()) >= lp["token_logprobs"][i + 1] - 1e-6
               for i, top in enumerate(lp["top_logprobs"][1:]))
    answered = server.post("/v1/completions", {**body, "max_tokens": 3}).json()["choices"][0]
    assert answered["text"].startswith(prompt) and len(answered["logprobs"]["tokens"]) == len(ids) + 3
    assert answered["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(lp["token_logprobs"][1:], abs=1e-6)
    stream = client(server).completions.create(model="m", prompt=prompt, max_tokens=3, echo=True, temperature=0,
                                               stream=True)
    texts = [c.choices[0].text for c in stream if c.choices]
    assert texts[0] == prompt and "".join(texts) == answered["text"]


def test_llamacpp_completion_fields(server):
    r = server.post("/completion", {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0})
    body = r.json()
    assert r.status_code == 200
    for key in ("content", "tokens", "stop", "stop_type", "stopping_word", "timings"):
        assert key in body
    assert body["stop_type"] == "limit" and len(body["tokens"]) == 8
    assert body["timings"]["predicted_n"] == 8 and body["timings"]["predicted_per_second"] > 0
    ids = server.post("/tokenize", {"content": "The capital of France is"}).json()["tokens"]
    same = server.post("/completion", {"prompt": ids, "n_predict": 8, "temperature": 0}).json()
    assert same["tokens"] == body["tokens"]
    assert server.post("/detokenize", {"tokens": body["tokens"]}).json()["content"] == body["content"]
    stopped = server.post("/completion", {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0,
                                          "stop": ["."]}).json()
    assert stopped["stop_type"] == "word" and stopped["stopping_word"] == "." and "." not in stopped["content"]
    with httpx.stream("POST", f"{server.url}/completion", timeout=60,
                      content=json.dumps({"prompt": "The capital of France is", "n_predict": 8, "temperature": 0,
                                          "stream": True})) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == body["content"]
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit" and "timings" in events[-1]


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "The quick brown fox", "Water boils at", "In 1492, Columbus", "import numpy as np\n",
           "My favourite colour is", "The largest planet is", "Roses are red,", "SELECT * FROM",
           "A haiku about rain:", "The sun rises in the", "Translate to French: cat =>", "Dear Sir or Madam,"]


def _greedy(server, prompt: str, n: int) -> list[int]:
    r = server.post("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_sixteen_concurrent_requests_equal_each_alone(server):
    lengths = [4 + (i * 5) % 20 for i in range(16)]
    alone = [_greedy(server, p, n) for p, n in zip(PROMPTS, lengths)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda a: _greedy(server, *a), zip(PROMPTS, lengths)))
    assert together == alone


@pytest.fixture(scope="module")
def quantized():
    """Default flags: Q4_1/Q8_0 weights through the CPU block kernels with 8-bit activations, where the last bit of
    a sum can flip a later rounding. Prompts read in chunks of 8."""
    s = Server("--model", "smollm2", "--max_batch", "12", "--n_ctx", "256", "--prefill_chunk", "8", "--max_queue", "256")
    yield s
    assert s.stop() == [0]


def _complete(server, prompt: str, n: int, cache: bool = True) -> dict:
    r = server.post("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": cache})
    assert r.status_code == 200, r.text
    return r.json()


SHARED = "You answer in a few words, and you never repeat the question. "


def test_answers_do_not_depend_on_the_batch_the_chunks_or_the_cache_on_the_default_quantized_path(quantized):
    """Prompts read in chunks between decode steps, packed beside others' chunks, and after a shared prefix the
    cache holds give the answers each gives alone, read whole from an empty cache."""
    prompts = [SHARED + p for p in PROMPTS[:12]]
    lengths = [6 + (i * 7) % 18 for i in range(12)]
    alone = [_complete(quantized, p, n, cache=False)["tokens"] for p, n in zip(prompts, lengths)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda a: _complete(quantized, *a), zip(prompts, lengths)))
    assert [r["tokens"] for r in together] == alone
    assert all(r["tokens_cached"] % 8 == 0 for r in together) and max(r["tokens_cached"] for r in together) >= 8


def test_nothing_lost_among_256_clients_with_some_leaving_mid_stream(quantized):
    """256 streaming clients on 12 slots, every tenth leaving after its first token: every other one gets the
    answer its prompt gets alone, and afterwards no slot is busy and the server still answers."""
    prompts = [f"{SHARED}{p} ({i})" for i, p in enumerate(PROMPTS * 2)][:24]
    lengths = [3 + i % 9 for i in range(24)]
    alone = [_complete(quantized, p, n, cache=False)["tokens"] for p, n in zip(prompts, lengths)]

    async def client(i: int, http: httpx.AsyncClient) -> list[int] | None:
        body = {"prompt": prompts[i % 24], "n_predict": lengths[i % 24], "temperature": 0}
        return await streamed_tokens(http, quantized.url, body, leave_after_first=i % 10 == 0)

    async def all_clients() -> list:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(*(client(i, http) for i in range(256)))

    answers = asyncio.run(all_clients())
    for i, tokens in enumerate(answers):
        assert (tokens is None) == (i % 10 == 0)
        assert tokens is None or tokens == alone[i % 24], i
    deadline = time.monotonic() + 30
    while httpx.get(f"{quantized.url}/health").json()["slots_processing"]:
        assert time.monotonic() < deadline, "a slot stayed busy"
        time.sleep(0.2)
    assert _complete(quantized, prompts[0], lengths[0])["tokens"] == alone[0]


def test_seeded_sampling_is_reproducible_in_any_batch(server):
    body = {"prompt": "Once upon a time", "n_predict": 16, "temperature": 1.0, "seed": 1234}
    alone = server.post("/completion", body).json()["tokens"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_greedy, server, p, 12) for p in PROMPTS[:3]]
        batched = pool.submit(lambda: server.post("/completion", body).json()["tokens"]).result()
        [o.result() for o in others]
    assert batched == alone


@pytest.mark.parametrize("path,body,status,code", [
    ("/completion", b"{not json", 400, "invalid_json"),
    ("/completion", {"prompt": 42}, 400, None),
    ("/completion", {"prompt": "hi", "n_predict": "ten"}, 400, None),
    ("/completion", {"prompt": "hi", "n_predict": -5}, 400, None),
    ("/completion", {"prompt": "hi", "temperature": "hot"}, 400, None),
    ("/completion", {"prompt": "word " * 600}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/completion", b"x" * (2 << 20), 413, "body_too_large"),
])
def test_bad_input_gets_an_error_then_service_continues(server, path, body, status, code):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code
    assert _greedy(server, "The capital of France is", 3)  # still serving


def test_disconnected_stream_frees_its_slot(server):
    with httpx.stream("POST", f"{server.url}/completion", timeout=60,
                      content=json.dumps({"prompt": "Once upon a time", "n_predict": 400, "stream": True})) as s:
        for i, _ in enumerate(s.iter_lines()):
            if i > 4:
                break
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/health").json()["slots_processing"]:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.2)


def test_a_full_queue_answers_503_before_a_stream_begins(server):
    """16 slots and 64 places in the queue: of 100 streams asked for at once (and held open), those that find the
    queue full get a 503 with its JSON error, not a stream that breaks; leaving frees every slot."""
    async def ask(http: httpx.AsyncClient, answered: list, everyone: asyncio.Event) -> int:
        body = {"prompt": "Once upon a time", "n_predict": 200, "stream": True}
        async with http.stream("POST", f"{server.url}/completion", json=body) as r:
            if r.status_code == 503:
                assert json.loads(await r.aread())["error"]["code"] == "queue_full"
            answered.append(r.status_code)
            if len(answered) == 100:
                everyone.set()
            await everyone.wait()
            return r.status_code

    async def ask_all() -> list[int]:
        answered, everyone = [], asyncio.Event()
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=128)) as http:
            return await asyncio.gather(*(ask(http, answered, everyone) for _ in range(100)))

    statuses = asyncio.run(ask_all())
    assert set(statuses) == {200, 503} and 64 < statuses.count(200) <= 16 + 64
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").json()["slots_processing"]:
        assert time.monotonic() < deadline, "the streams that left did not free their slots"
        time.sleep(0.2)


def test_port_in_use_fails_fast_and_clearly():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "llama_dist.cli", "serve", "--port", str(port)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"Could not listen on 127.0.0.1:{port}" in r.stderr and "Loaded" not in r.stdout


TWO_RANK_ANSWERS: dict[int, list] = {}


@pytest.mark.parametrize("pp", [1, 2])
def test_api_key_and_two_ranks(pp, tiny_checkpoints, sp_tokenizer):
    """A tiny model over 2 Gloo ranks (tensor parallel with the engine's overlap, every rank feeding the tokens it
    chose on its device to the next step; or --pp 2: a layer per stage) with --api_key: 401 without it; batching
    still equals alone, in a KV cache of one context for 8 sequences (requests preempted, and every rank following
    rank 0's block tables), and both layouts answer alike; SIGTERM exits all."""
    s = Server("--model", str(tiny_checkpoints["mp2"]), "--tokenizer", str(sp_tokenizer), "--api_key", "sekrit",
               "--max_batch", "8", "--n_ctx", "128", "--kv_tokens", "128", "--backend", "gloo", "--pp", str(pp),
               "--overlap", str(pp == 1), world=2)
    try:
        assert s.post("/completion", {"prompt": "hi"}).status_code == 401
        auth = {"Authorization": "Bearer sekrit"}

        def greedy(prompt, n):
            return s.post("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0},
                          headers=auth).json()["tokens"]

        # answers long enough (2-3 blocks each, 8 blocks in all) that the 8 overlap and some are preempted however
        # the requests' arrivals spread
        alone = [greedy(p, 20 + i) for i, p in enumerate(PROMPTS[:8])]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda a: greedy(*a), [(p, 20 + i) for i, p in enumerate(PROMPTS[:8])]))
        assert together == alone and all(len(t) > 0 for t in alone)
        metrics = httpx.get(f"{s.url}/metrics", headers=auth).text
        assert float(re.search(r"^llamadist_requests_preempted_total (\S+)$", metrics, re.M)[1]) > 0
        TWO_RANK_ANSWERS[pp] = alone
        if len(TWO_RANK_ANSWERS) == 2:
            assert TWO_RANK_ANSWERS[1] == TWO_RANK_ANSWERS[2]
    finally:
        assert s.stop() == [0, 0]


def test_the_server_sends_without_waiting_for_acknowledgements():
    """Nagle's algorithm is off on the server's connections (asyncio turns it off where a listening socket says it is
    TCP): with it on, a kept-alive client's every request after the first waited up to 40 ms for its response's
    body (the client acknowledges the headers late, by design)."""
    sock = listen("127.0.0.1", free_port())[0]

    async def nodelay_of_a_connection() -> int:
        loop = asyncio.get_running_loop()
        seen = loop.create_future()

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport):
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await loop.create_server(Protocol, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(nodelay_of_a_connection()) != 0
