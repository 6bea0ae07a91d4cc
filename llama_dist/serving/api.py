"""HTTP API on rank 0: what llama.cpp's server and OpenAI-compatible servers answer, on one engine.

Handlers validate and tokenize, hand Requests to the Engine, and relay its events (streamed as
server-sent events, or collected into one JSON body). Errors use OpenAI's shape:
{"error": {"message", "type", "code"}}. The endpoints themselves live in llamacpp_routes.py and
openai_routes.py; this module holds what they share and the app (routes, CORS).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..generation.constraints import Constraint, GrammarError, gbnf_grammar, json_schema_grammar
from ..generation.sampling import SamplingParams
from ..tokenizer.chat import check_messages
from .cors import CORS
from .engine import Engine, QueueFull, Request

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.2  # how often a waiting non-streamed request checks that its client is still there
MAX_SHIFTED_CONTEXTS = 4  # with context shift, n_predict -1 stops after this many contexts' worth of tokens
CHAT_PAGE = Path(__file__).resolve().parent / "static" / "index.html"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 **details: Any):
        """details: more fields of the error object (llama.cpp's n_prompt_tokens and n_ctx, say)."""
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.details = status, message, type_, code, details

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "code": self.code,
                                       **self.details}}, status_code=self.status)


@dataclass
class State:
    """What the handlers share; `engine` is None while the model loads. One model is served, so any model
    name a client sends is accepted (and echoed back)."""

    model_name: str
    api_key: str | None = None
    model_path: str = ""
    slots_endpoint: bool = True  # GET /slots (llama.cpp's --no-slots turns it off)
    context_shift: bool = False  # llama.cpp's --context-shift: cut long prompts, shift full contexts
    n_predict: int = -1  # tokens an answer may have when the request does not say (-1: until the context is full)
    seed: int | None = None  # sampling seed of requests that give none (None: a fresh one each)
    temperature: float | None = None  # sampling temperature of requests that give none (None: the API's default)
    aliases: tuple[str, ...] = ()  # more names of the model (llama.cpp's --alias a,b,c), shown in /models
    tags: tuple[str, ...] = ()  # llama.cpp's --tags, shown in /models
    cors_origins: tuple[str, ...] = ("*",)  # which pages on other origins may call us (serving/cors.py)
    ui: bool = True  # the chat page at /
    engine: Engine | None = field(default=None, repr=False)
    relays: dict = field(default_factory=dict, repr=False)

    def relay(self, loop: asyncio.AbstractEventLoop) -> "EventRelay":
        """The event relay into this event loop (the server runs one)."""
        if loop not in self.relays:
            self.relays[loop] = EventRelay(loop)
        return self.relays[loop]


class EventRelay:
    """Hands the engine thread's events to the event loop's queues, waking the loop once for all the events
    posted before it runs (a decode step posts one per running request) rather than once per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.pending, self.lock = loop, [], threading.Lock()

    def post(self, queue: asyncio.Queue, event: dict) -> None:
        with self.lock:
            self.pending.append((queue, event))
            wake = len(self.pending) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


def _field(body: dict, name: str, kind: type | tuple, default: Any, check=None, why: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise APIError(400, f"'{name}' must be {getattr(kind, '__name__', kind)}, got a boolean.")
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise APIError(400, f"'{name}' must be of type {names}, got {type(value).__name__}.")
    if check is not None and not check(value):
        raise APIError(400, f"'{name}'={value!r} is out of range{': ' + why if why else ''}.")
    return value


def sampling_from(body: dict, openai: bool, temperature: float | None = None) -> SamplingParams:
    """The request's sampler settings; what it leaves out takes its API's defaults (temperature: the server's,
    where it sets one)."""
    number = (int, float)
    default_temperature = temperature if temperature is not None else 1.0 if openai else 0.8
    return SamplingParams(
        temperature=float(_field(body, "temperature", number, default_temperature, lambda v: 0 <= v <= 5)),
        top_k=_field(body, "top_k", int, 0 if openai else 40, lambda v: v >= 0),
        top_p=float(_field(body, "top_p", number, 1.0 if openai else 0.95, lambda v: 0 < v <= 1)),
        min_p=float(_field(body, "min_p", number, 0.0 if openai else 0.05, lambda v: 0 <= v <= 1)),
        repeat_penalty=float(_field(body, "repeat_penalty", number, 1.0, lambda v: 0 < v <= 10)),
        frequency_penalty=float(_field(body, "frequency_penalty", number, 0.0, lambda v: -2 <= v <= 2)),
        presence_penalty=float(_field(body, "presence_penalty", number, 0.0, lambda v: -2 <= v <= 2)),
        repeat_last_n=_field(body, "repeat_last_n", int, 64, lambda v: v >= -1, "use -1 (all), 0 (none) or more"))


def _prompt_string(prompt: Any) -> Any:
    """llama.cpp's JSON prompt object: its text (this server reads no images or audio)."""
    if not isinstance(prompt, dict):
        return prompt
    if prompt.get("multimodal_data"):
        raise APIError(400, "This model reads text only: 'multimodal_data' is not supported.")
    return prompt.get("prompt_string")


def _grammar(body: dict) -> str | None:
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise APIError(400, "'response_format' must be {\"type\": \"text\" | \"json_object\" | "
                                "\"json_schema\"}.")
        if fmt["type"] == "json_object":
            return json_schema_grammar(fmt.get("schema") or {"type": "object"})
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise APIError(400, "'response_format.json_schema' must be {\"name\", \"schema\": {...}}.")
            return json_schema_grammar(spec.get("schema", {}))
    if body.get("json_schema") is not None:
        schema = body["json_schema"]
        if not isinstance(schema, (dict, bool)):
            raise APIError(400, "'json_schema' must be a JSON schema object.")
        return json_schema_grammar(schema)
    if body.get("grammar") is not None:
        if not isinstance(body["grammar"], str) or not body["grammar"].strip():
            raise APIError(400, "'grammar' must be a GBNF grammar (a non-empty string).")
        return gbnf_grammar(body["grammar"])
    return None


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Handlers:
    """What every endpoint needs: the engine, the checked body, prompts made into Requests, their events."""

    def __init__(self, state: State):
        self.state = state

    @property
    def engine(self) -> Engine:
        if self.state.engine is None:
            raise APIError(503, "The model is still loading; try again shortly.", "unavailable", "loading")
        return self.state.engine

    @property
    def tokenizer(self):
        return self.engine.llama.tokenizer

    def _piece(self, token: int) -> dict:
        """A token's id, text and UTF-8 bytes, as log-probability answers show it."""
        text = self.tokenizer.decode([token])
        return {"id": token, "token": text, "bytes": list(text.encode("utf-8"))}

    def _verbose(self, req: Request, text: str) -> dict:
        """llama.cpp's __verbose (a request's "verbose": true): what the model read and wrote, as tokens and text."""
        return {"prompt": self.tokenizer.decode(req.prompt_ids), "content": text, "tokens": list(req.generated),
                "tokens_evaluated": len(req.prompt_ids), "tokens_cached": req.reused}

    def _authorise(self, request: HTTPRequest) -> None:
        """The API key, as OpenAI's clients send it (Authorization: Bearer) or Anthropic's (x-api-key)."""
        key, headers = self.state.api_key, request.headers
        if key and not (hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {key}".encode())
                        or hmac.compare_digest(headers.get("x-api-key", "").encode(), key.encode())):
            raise APIError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                           "authentication_error", "invalid_api_key")

    async def _body(self, request: HTTPRequest) -> dict:
        self._authorise(request)
        if request.method == "GET":
            return {}
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise APIError(413, f"Request body over {MAX_BODY_BYTES} bytes.", code="body_too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"Request body over {MAX_BODY_BYTES} bytes.", code="body_too_large")
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The body is not valid JSON: {e}.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "The body must be a JSON object.", code="invalid_json")
        return body

    def _model_name(self, body: dict) -> str:
        """The name the client asked for (any is accepted: one model is served), else the served model's."""
        model = body.get("model")
        return model if isinstance(model, str) and model else self.state.model_name

    def _messages(self, body: dict) -> list[dict]:
        """OpenAI messages: content a string or a list of text parts (joined by newlines, as llama.cpp does)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "'messages' must be a list of {role, content} objects.")
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, "Message content parts must be {\"type\": \"text\", \"text\": ...}; "
                                        "this model reads text only.")
                content = "\n".join(p["text"] for p in content)
            out.append({**m, "content": content})
        try:
            check_messages(out)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return out

    @staticmethod
    def _continue_final(body: dict) -> bool:
        """Whether a final assistant message is continued (llama.cpp's default; vLLM's continue_final_message, which
        add_generation_prompt: true contradicts)."""
        add = _field(body, "add_generation_prompt", bool, None)
        cont = _field(body, "continue_final_message", bool, None)
        if add and cont:
            raise APIError(400, "'add_generation_prompt' and 'continue_final_message' cannot both be true.")
        return cont if cont is not None else not add

    def _prompt_ids(self, prompt: Any) -> list[int]:
        """One prompt: text, token ids, or a mix of both (llama.cpp)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            return tok.encode(prompt, bos=True)
        if isinstance(prompt, list) and prompt and all(isinstance(p, (int, str)) and not isinstance(p, bool)
                                                        for p in prompt):
            ids = []
            for i, part in enumerate(prompt):
                ids += tok.encode(part, bos=i == 0) if isinstance(part, str) else [part]
            if not all(0 <= t < tok.n_words for t in ids):
                raise APIError(400, f"Token ids must be in 0..{tok.n_words - 1}.")
            return ids
        raise APIError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of those.")

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """One or several prompts: a list whose items are texts, token-id lists or {"prompt_string": text}
        objects is one prompt each (a list with token ids in it is one prompt)."""
        several = isinstance(prompt, list) and len(prompt) > 0 and all(isinstance(p, (str, list, dict))
                                                                      for p in prompt)
        if several:
            return [self._prompt_ids(_prompt_string(p)) for p in prompt]
        return [self._prompt_ids(_prompt_string(prompt))]

    def _request(self, ids: list[int], body: dict, openai: bool, max_name: str, default_max: int | None = None,
                 top_logprobs: int | None = None, prompt_logprobs: int | None = None) -> Request:
        """A Request for the engine, as llama.cpp's server makes one. Without context shift (its default) the
        answer is capped at the context left (n_predict -1 or more than fits: until the context is full) and a
        prompt that leaves no room is refused. With it, a long prompt keeps its first n_keep tokens and loses
        whole blocks after them, and a full context drops half of what follows them and goes on."""
        n_ctx = self.engine.model.n_ctx
        if not ids:
            raise APIError(400, "The prompt is empty.")
        shift = self.state.context_shift
        n_keep = _field(body, "n_keep", int, 0, lambda v: -1 <= v < n_ctx - 1, f"use -1..{n_ctx - 2}")
        n_keep = len(ids) if n_keep == -1 else n_keep  # -1: the whole prompt
        truncated = False
        if len(ids) >= n_ctx:
            if not shift or n_keep >= n_ctx - 1:
                raise APIError(400, f"The request exceeds the available context size: the prompt has {len(ids)} "
                                    f"tokens and the context holds {n_ctx} (including the answer). Shorten the "
                                    "prompt" + ("." if shift else ", or start the server with --context_shift."),
                           "exceed_context_size_error", code="context_length_exceeded", n_prompt_tokens=len(ids),
                           n_ctx=n_ctx)
            block = (n_ctx - n_keep) // 2
            erased = (len(ids) - n_keep - block) // block
            ids, truncated = ids[:n_keep] + ids[n_keep + erased * block:], True
        default = default_max if default_max is not None and self.state.n_predict == -1 else self.state.n_predict
        n = _field(body, max_name, int, default, lambda v: v >= -1, "use -1 (until the context is full) or more")
        room = MAX_SHIFTED_CONTEXTS * n_ctx if shift else n_ctx - len(ids)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(w, str) and w for w in stop):
            raise APIError(400, "'stop' must be a string or a list of non-empty strings.")
        seed = _field(body, "seed", int, None)
        seed = self.state.seed if seed is None or seed < 0 else seed
        params = sampling_from(body, openai, self.state.temperature)
        params.logit_bias = self._logit_bias(body)
        return Request(ids, params, room if n == -1 else min(n, room), on_event=lambda e: None,
                       stop_words=stop, seed=seed, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
                       ignore_eos=_field(body, "ignore_eos", bool, False), constraint=self._constraint(body),
                       n_keep=min(n_keep, len(ids)) if shift else None, prompt_truncated=truncated,
                       cache_prompt=_field(body, "cache_prompt", bool, True),
                       timings_per_token=_field(body, "timings_per_token", bool, False),
                       return_progress=_field(body, "return_progress", bool, False) and _field(body, "stream", bool,
                                                                                               False))

    def _logit_bias(self, body: dict) -> dict[int, float]:
        """llama.cpp's [[token, bias], ...] or OpenAI's {token: bias}: a token is an id (or its digits) or text,
        whose every token gets the bias; a bias of false bans the token."""
        raw = body.get("logit_bias")
        if raw is None:
            return {}
        pairs = list(raw.items()) if isinstance(raw, dict) else raw
        if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise APIError(400, "'logit_bias' must be {token: bias} or [[token, bias], ...].")
        n = self.tokenizer.n_words
        bias = {}
        for token, value in pairs:
            if value is False:
                value = float("-inf")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise APIError(400, f"'logit_bias' for {token!r} must be a number or false.")
            if isinstance(token, str) and not token.lstrip("-").isdigit():
                ids = self.tokenizer.encode(token, bos=False)
            elif isinstance(token, (int, str)) and not isinstance(token, bool):
                ids = [int(token)]
            else:
                raise APIError(400, f"'logit_bias' keys must be token ids or text, got {token!r}.")
            if not all(0 <= i < n for i in ids):
                raise APIError(400, f"'logit_bias' token ids must be in 0..{n - 1}.")
            bias.update((i, float(value)) for i in ids)
        if sum(b == float("-inf") for b in bias.values()) >= n:
            raise APIError(400, "'logit_bias' bans every token: nothing is left to choose from.")
        return bias

    def _constraint(self, body: dict) -> Constraint | None:
        """The output's required form: OpenAI's response_format (json_object, json_schema), or llama.cpp's
        json_schema / grammar (GBNF). A value that is not one of these, or does not compile, gets a 400."""
        try:
            grammar = _grammar(body)
            return None if grammar is None else Constraint(grammar, self.tokenizer, self.engine.model.args.vocab_size)
        except GrammarError as e:
            raise APIError(400, str(e), code="invalid_grammar") from None

    def _events(self, req: Request) -> AsyncIterator[dict]:
        """Submit the request now (a full queue answers 503 before a streamed response has begun) and return
        its events from the engine; a client that goes away while they are read cancels the request."""
        events: asyncio.Queue = asyncio.Queue()
        relay = self.state.relay(asyncio.get_running_loop())
        req.on_event = lambda e: relay.post(events, e)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            raise APIError(503, f"Server busy: {e}. Retry later.", "unavailable", "queue_full") from None
        return self._relay(req, events)

    @staticmethod
    async def _relay(req: Request, events: asyncio.Queue) -> AsyncIterator[dict]:
        try:
            while True:
                event = await events.get()
                yield event
                if event["type"] in ("done", "error"):
                    return
        finally:
            req.cancel()  # no-op once done; frees the slot when the client disconnected

    @staticmethod
    async def _collect(events: AsyncIterator[dict]) -> tuple[str, dict]:
        """The whole answer and the final event, for non-streaming responses."""
        text = []
        async for e in events:
            if e["type"] == "token":
                text.append(e["text"])
            elif e["type"] == "error":
                raise APIError(500, e["message"], "server_error")
            elif e["type"] != "progress":
                return "".join(text), e
        raise APIError(500, "generation ended without a result", "server_error")

    async def _collect_all(self, reqs: list[Request], client: HTTPRequest) -> list[tuple[str, dict]]:
        """Several prompts at once (they share the running batch), cancelled if the client goes away before
        the answers are complete (a streamed request notices that itself), or if the queue has no room for
        them all."""
        try:
            streams = [self._events(r) for r in reqs]
        except APIError:
            for r in reqs:
                r.cancel()
            raise

        async def watch() -> None:
            while not await client.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            for r in reqs:
                r.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return list(await asyncio.gather(*(self._collect(events) for events in streams)))
        finally:
            watcher.cancel()

    def truncated(self, req: Request) -> bool:
        """Whether the context ran out: the prompt was cut, a context shift dropped tokens, or the answer filled it."""
        return req.prompt_truncated or req.dropped > 0 or req.context_length() >= self.engine.model.n_ctx


def build_app(state: State) -> Starlette:
    from .llamacpp_routes import LlamaCppRoutes
    from .openai_routes import OpenAIRoutes

    class API(LlamaCppRoutes, OpenAIRoutes):
        pass

    api = API(state)

    def wrap(handler):
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                return e.response()
        return endpoint

    get, post = ["GET"], ["POST"]
    routes = [Route("/", api.page, methods=get)] if state.ui else []
    routes += [Route("/health", wrap(api.health), methods=get),
              Route("/v1/health", wrap(api.health), methods=get),
              Route("/metrics", wrap(api.metrics), methods=get),
              Route("/props", wrap(api.props), methods=get),
              Route("/slots", wrap(api.slots), methods=get),
              Route("/completion", wrap(api.completion), methods=post),
              Route("/completions", wrap(api.completion), methods=post),
              Route("/tokenize", wrap(api.tokenize), methods=post),
              Route("/detokenize", wrap(api.detokenize), methods=post),
              Route("/apply-template", wrap(api.apply_template), methods=post),
              Route("/v1/models", wrap(api.models), methods=get),
              Route("/models", wrap(api.models), methods=get),
              Route("/v1/completions", wrap(api.completions), methods=post),
              Route("/v1/chat/completions", wrap(api.chat_completions), methods=post),
              Route("/chat/completions", wrap(api.chat_completions), methods=post),
              Route("/v1/chat/completions/input_tokens", wrap(api.input_tokens), methods=post),
              Route("/chat/completions/input_tokens", wrap(api.input_tokens), methods=post),
              Route("/v1/embeddings", wrap(api.embeddings), methods=post),
              Route("/embeddings", wrap(api.embeddings), methods=post)]
    # Browser apps on other origins may call us (as llama.cpp's server allows); preflights need no API key.
    return Starlette(routes=routes, middleware=[Middleware(CORS, origins=state.cors_origins)])
