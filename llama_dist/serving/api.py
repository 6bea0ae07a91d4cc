"""HTTP API on rank 0: llama.cpp's /completion, /tokenize, /detokenize, and OpenAI's /v1 endpoints.

Handlers validate and tokenize, hand a Request to the Engine, and relay its events (streamed as
server-sent events, or collected into one JSON body). Errors use OpenAI's shape:
{"error": {"message", "type", "code"}}.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..generation.sampling import SamplingParams
from ..tokenizer.chat import encode_dialog
from .engine import Engine, QueueFull, Request

MAX_BODY_BYTES = 1 << 20
CHAT_PAGE = Path(__file__).resolve().parent / "static" / "index.html"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "code": self.code}},
                            status_code=self.status)


class State:
    """What the handlers share; `engine` is None while the model loads."""

    def __init__(self, model_name: str, api_key: str | None):
        self.model_name, self.api_key = model_name, api_key
        self.engine: Engine | None = None


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


def sampling_from(body: dict, openai: bool) -> SamplingParams:
    number = (int, float)
    return SamplingParams(
        temperature=float(_field(body, "temperature", number, 1.0 if openai else 0.8, lambda v: 0 <= v <= 5)),
        top_k=_field(body, "top_k", int, 0 if openai else 40, lambda v: v >= 0),
        top_p=float(_field(body, "top_p", number, 1.0 if openai else 0.95, lambda v: 0 < v <= 1)),
        min_p=float(_field(body, "min_p", number, 0.0 if openai else 0.05, lambda v: 0 <= v <= 1)),
        repeat_penalty=float(_field(body, "repeat_penalty", number, 1.0, lambda v: 0 < v <= 10)))


class API:
    def __init__(self, state: State):
        self.state = state

    @property
    def engine(self) -> Engine:
        if self.state.engine is None:
            raise APIError(503, "The model is still loading; try again shortly.", "unavailable", "loading")
        return self.state.engine

    async def _body(self, request: HTTPRequest) -> dict:
        if self.state.api_key and request.headers.get("authorization") != f"Bearer {self.state.api_key}":
            raise APIError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                           "authentication_error", "invalid_api_key")
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
        model = body.get("model")
        if model not in (None, "", self.state.model_name):
            raise APIError(404, f"Model '{model}' is not served here; this server has '{self.state.model_name}'.",
                           code="model_not_found")
        return body

    def _prompt_ids(self, prompt: Any) -> list[int]:
        tok = self.engine.llama.tokenizer
        if isinstance(prompt, str):
            return tok.encode(prompt, bos=True)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                        for t in prompt):
            if not all(0 <= t < tok.n_words for t in prompt):
                raise APIError(400, f"Token ids must be in 0..{tok.n_words - 1}.")
            return list(prompt)
        raise APIError(400, "'prompt' must be a non-empty string or a list of token ids.")

    def _request(self, ids: list[int], body: dict, openai: bool, max_name: str) -> Request:
        n_ctx = self.engine.model.n_ctx
        if not ids:
            raise APIError(400, "The prompt is empty.")
        if len(ids) >= n_ctx:
            raise APIError(400, f"The prompt has {len(ids)} tokens; the context holds {n_ctx} (including the answer). "
                                "Shorten the prompt.", code="context_length_exceeded")
        default = 16 if openai and max_name == "max_tokens" else -1
        n = _field(body, max_name, int, default, lambda v: v == -1 or 0 <= v <= n_ctx,
                   f"use -1 (until the context is full) or 0..{n_ctx}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(w, str) and w for w in stop):
            raise APIError(400, "'stop' must be a string or a list of non-empty strings.")
        seed = _field(body, "seed", int, None)
        seed = None if seed is None or seed < 0 else seed
        return Request(ids, sampling_from(body, openai), n_ctx - len(ids) if n == -1 else n, on_event=lambda e: None,
                       stop_words=stop, seed=seed)

    async def _events(self, req: Request) -> AsyncIterator[dict]:
        """Submit and yield the engine's events; a client that goes away cancels the request."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req.on_event = lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            raise APIError(503, f"Server busy: {e}. Retry later.", "unavailable", "queue_full") from None
        try:
            while True:
                event = await events.get()
                yield event
                if event["type"] in ("done", "error"):
                    return
        finally:
            req.cancel()  # no-op once done; frees the slot when the client disconnected

    async def _collect(self, req: Request) -> tuple[str, dict]:
        """The whole answer and the final event, for non-streaming responses."""
        text = []
        async for e in self._events(req):
            if e["type"] == "token":
                text.append(e["text"])
            elif e["type"] == "error":
                raise APIError(500, e["message"], "server_error")
            else:
                return "".join(text), e
        raise APIError(500, "generation ended without a result", "server_error")

    # ---- llama.cpp API ---------------------------------------------------------------------------
    async def completion(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        req = self._request(self._prompt_ids(body.get("prompt")), body, openai=False, max_name="n_predict")
        if _field(body, "stream", bool, False):
            async def sse():
                async for e in self._events(req):
                    if e["type"] == "token":
                        yield _sse({"content": e["text"], "tokens": [e["token"]], "stop": False})
                    elif e["type"] == "error":
                        yield _sse({"error": {"message": e["message"], "type": "server_error"}})
                    else:
                        yield _sse(self._llamacpp_final("", req, e))
            return StreamingResponse(sse(), media_type="text/event-stream")
        text, done = await self._collect(req)
        return JSONResponse(self._llamacpp_final(text, req, done))

    def _llamacpp_final(self, text: str, req: Request, done: dict) -> dict:
        return {"content": text, "tokens": list(req.generated), "stop": True, "stop_type": done["stop_type"],
                "stopping_word": done["stopping_word"], "model": self.state.model_name,
                "tokens_predicted": len(req.generated), "tokens_evaluated": len(req.prompt_ids),
                "timings": done["timings"]}

    async def tokenize(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        content = _field(body, "content", str, None)
        if content is None:
            raise APIError(400, "'content' (a string) is required.")
        add_special = _field(body, "add_special", bool, False)
        return JSONResponse({"tokens": self.engine.llama.tokenizer.encode(content, bos=add_special)})

    async def detokenize(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        tokens = _field(body, "tokens", list, None)
        n = self.engine.llama.tokenizer.n_words
        if tokens is None or not all(isinstance(t, int) and 0 <= t < n for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids in 0..{n - 1}.")
        return JSONResponse({"content": self.engine.llama.tokenizer.decode(tokens)})

    # ---- OpenAI API ------------------------------------------------------------------------------
    async def models(self, request: HTTPRequest) -> Response:
        await self._body(request)
        return JSONResponse({"object": "list", "data": [{"id": self.state.model_name, "object": "model",
                                                         "created": 0, "owned_by": "llama-dist"}]})

    async def completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        req = self._request(self._prompt_ids(prompt), body, openai=True, max_name="max_tokens")
        return await self._openai(req, body, chat=False)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "'messages' must be a list of {role, content} objects.")
        try:
            ids = encode_dialog(messages, self.engine.llama.tokenizer)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        req = self._request(ids, body, openai=True, max_name=name)
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            req.max_new_tokens = self.engine.model.n_ctx - len(ids)
        return await self._openai(req, body, chat=True)

    async def _openai(self, req: Request, body: dict, chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, obj = int(time.time()), "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": created, "model": self.state.model_name}
        if _field(body, "stream", bool, False):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def sse():
                if chat:
                    yield _sse({**head, "object": "chat.completion.chunk",
                                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
                async for e in self._events(req):
                    if e["type"] == "error":
                        yield _sse({"error": {"message": e["message"], "type": "server_error"}})
                        break
                    finish = None if e["type"] == "token" else _finish_reason(e["stop_type"])
                    text = e.get("text", "")
                    choice = ({"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                              if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
                    yield _sse({**head, "object": "chat.completion.chunk" if chat else obj, "choices": [choice]})
                    if finish and include_usage:
                        yield _sse({**head, "object": "chat.completion.chunk" if chat else obj, "choices": [],
                                    "usage": _usage(req)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        text, done = await self._collect(req)
        finish = _finish_reason(done["stop_type"])
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return JSONResponse({**head, "object": obj, "choices": [choice], "usage": _usage(req)})

    async def page(self, request: HTTPRequest) -> Response:
        """The chat web page: a static, self-contained client of /v1/chat/completions."""
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    async def health(self, request: HTTPRequest) -> Response:
        if self.state.engine is None:
            return APIError(503, "Loading model", "unavailable", "loading").response()
        engine = self.state.engine
        busy = len(engine.running)
        return JSONResponse({"status": "ok", "slots_idle": engine.max_batch - busy, "slots_processing": busy,
                             "requests_waiting": engine.waiting.qsize()})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _finish_reason(stop_type: str) -> str:
    return {"eos": "stop", "word": "stop", "limit": "length"}.get(stop_type, "stop")


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.generated),
            "total_tokens": len(req.prompt_ids) + len(req.generated)}


def build_app(state: State) -> Starlette:
    api = API(state)

    def wrap(handler):
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                return e.response()
        return endpoint

    routes = [Route("/", api.page, methods=["GET"]),
              Route("/health", wrap(api.health), methods=["GET"]),
              Route("/completion", wrap(api.completion), methods=["POST"]),
              Route("/completions", wrap(api.completion), methods=["POST"]),
              Route("/tokenize", wrap(api.tokenize), methods=["POST"]),
              Route("/detokenize", wrap(api.detokenize), methods=["POST"]),
              Route("/v1/models", wrap(api.models), methods=["GET"]),
              Route("/v1/completions", wrap(api.completions), methods=["POST"]),
              Route("/v1/chat/completions", wrap(api.chat_completions), methods=["POST"])]
    return Starlette(routes=routes)
