"""OpenAI's /v1 endpoints (and their aliases without /v1): models, completions, chat completions, with
streaming, usage, finish reasons and log-probabilities as the OpenAI API reference describes them."""
from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import AsyncIterator

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from ..generation.sampling import SamplingParams
from ..tokenizer.chat import encode_dialog
from .api import APIError, Handlers, _field, sse
from .engine import Request

FINGERPRINT = f"b{__version__}-llama-dist"  # system_fingerprint: which build answered (llama.cpp's "b<build>-...")


class OpenAIRoutes(Handlers):
    async def models(self, request: HTTPRequest) -> Response:
        self._authorise(request)
        state = self.state
        return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                                         "owned_by": "llama-dist", "aliases": list(state.aliases),
                                                         "tags": list(state.tags)}]})

    async def completions(self, request: HTTPRequest) -> Response:
        """echo: the answer's text (and log-probabilities) start with the prompt's (with max_tokens 0, a prompt's
        log-probabilities alone: scoring)."""
        body = await self._body(request)
        logprobs = _field(body, "logprobs", int, None, lambda v: 0 <= v <= 20)
        echo = _field(body, "echo", bool, False)
        reqs = [req for ids in self._prompts(body.get("prompt")) for req in self._choices(
            body, lambda: self._request(ids, body, openai=True, max_name="max_tokens", default_max=16,
                                        top_logprobs=logprobs, prompt_logprobs=logprobs if echo else None))]
        return await self._answer(reqs, body, chat=False, client=request)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        ids = self._chat_ids(body)
        top = _field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20)
        wanted = _field(body, "logprobs", bool, False)
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        reqs = self._choices(body, lambda: self._request(ids, body, openai=True, max_name=name,
                                                           top_logprobs=top if wanted else None))
        return await self._answer(reqs, body, chat=True, client=request)

    async def input_tokens(self, request: HTTPRequest) -> Response:
        """How many prompt tokens a chat request's messages make (llama.cpp's /chat/completions/input_tokens)."""
        return JSONResponse({"input_tokens": len(self._chat_ids(await self._body(request)))})

    def _chat_ids(self, body: dict) -> list[int]:
        """The prompt ids the model's chat template makes of the request's messages."""
        try:
            return encode_dialog(self._messages(body), self.tokenizer, strict=False,
                                 continue_final=self._continue_final(body))
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def _choices(self, body: dict, make) -> list[Request]:
        """OpenAI's n: that many answers to one prompt (with a seed, seed, seed + 1, ...: different answers)."""
        n = _field(body, "n", int, 1, lambda v: 1 <= v <= 16, "1 to 16")
        reqs = [make() for _ in range(n)]
        for i, req in enumerate(reqs):
            if req.seed is not None:
                req.seed += i
        return reqs

    async def embeddings(self, request: HTTPRequest) -> Response:
        """One vector per input (text, token ids, or a list of either): the model's final hidden states pooled as
        its file declares (mean by default) and scaled to unit length."""
        body = await self._body(request)
        fmt = _field(body, "encoding_format", str, "float", lambda v: v in ("float", "base64"), "float or base64")
        inputs = body.get("input")
        if inputs is None or inputs == [] or inputs == "":
            raise APIError(400, "'input' must be a non-empty string, a list of token ids, or a list of those.")
        reqs = [self._embedding_request(ids) for ids in self._prompts(inputs)]
        data = []
        for i, (_, done) in enumerate(await self._collect_all(reqs, request)):
            vector = done["embedding"]
            if fmt == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(r.prompt_ids) for r in reqs)
        return JSONResponse({"object": "list", "data": data, "model": self._model_name(body),
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _embedding_request(self, ids: list[int]) -> Request:
        n_ctx = self.engine.model.n_ctx
        if len(ids) > n_ctx:
            raise APIError(400, f"The input exceeds the available context size: {len(ids)} tokens, the context "
                                f"holds {n_ctx}.", code="context_length_exceeded")
        return Request(ids, SamplingParams(), 0, on_event=lambda e: None, embed=True)

    async def _answer(self, reqs: list[Request], body: dict, chat: bool, client: HTTPRequest) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": int(time.time()), "model": self._model_name(body),
                "system_fingerprint": FINGERPRINT}
        if _field(body, "stream", bool, False):
            if len(reqs) > 1:
                raise APIError(400, "Streaming takes one prompt and one choice; send several without 'stream'.")
            events = self._events(reqs[0])
            return StreamingResponse(self._openai_stream(reqs[0], events, body, head, chat),
                                     media_type="text/event-stream")
        choices = []
        echo = not chat and _field(body, "echo", bool, False)
        for i, (req, (text, done)) in enumerate(zip(reqs, await self._collect_all(reqs, client))):
            entries = req.prompt_token_logprobs + req.logprobs if echo else req.logprobs
            text = self._echo(req) + text if echo else text
            choice = {"index": i, "finish_reason": _finish_reason(done["stop_type"]),
                      "logprobs": self._logprobs(entries, chat, text) if req.top_logprobs is not None else None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        usage = {key: sum(_usage(r)[key] for r in reqs) for key in ("prompt_tokens", "completion_tokens",
                                                                     "total_tokens")}
        usage["prompt_tokens_details"] = {"cached_tokens": sum(r.reused for r in reqs)}
        answer = {**head, "object": obj, "choices": choices, "usage": usage}
        if _field(body, "verbose", bool, False):
            first = choices[0]
            answer["__verbose"] = self._verbose(reqs[0], first["message"]["content"] if chat else first["text"])
        return JSONResponse(answer)

    async def _openai_stream(self, req: Request, events: AsyncIterator[dict], body: dict, head: dict, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if chat:
            yield sse({**head, "object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                                                           "finish_reason": None}]})
        echo = not chat and _field(body, "echo", bool, False)
        async for e in events:
            if e["type"] == "error":
                yield sse({"error": {"message": e["message"], "type": "server_error"}})
                break
            if e["type"] == "progress":
                yield sse({**head, "object": obj, "choices": [], "prompt_progress": e["prompt_progress"]})
                continue
            if echo:  # the prompt first, once it is read (its log-probabilities are known then)
                echo, text = False, self._echo(req)
                logprobs = (self._logprobs(req.prompt_token_logprobs, chat, text) if req.top_logprobs is not None
                            else None)
                yield sse({**head, "object": obj,
                           "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": logprobs}]})
            finish = None if e["type"] == "token" else _finish_reason(e["stop_type"])
            text = e.get("text", "")
            logprobs = (self._logprobs(e["logprobs"], chat, text)
                        if e["type"] == "token" and e["logprobs"] is not None else None)
            choice = ({"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish})
            choice["logprobs"] = logprobs
            timing = {"timings": e["timings"]} if "timings" in e else {}  # each event, with timings_per_token
            yield sse({**head, "object": obj, "choices": [choice], **timing})
            if finish and include_usage:
                yield sse({**head, "object": obj, "choices": [], "usage": _usage(req), "timings": e["timings"]})
        yield "data: [DONE]\n\n"

    def _echo(self, req: Request) -> str:
        """The prompt's text, as its tokens decode (without a beginning-of-sequence token)."""
        ids = req.prompt_ids
        return self.tokenizer.decode(ids[1:] if ids[0] == self.tokenizer.bos_id else ids)

    def _logprobs(self, logprobs: list[dict], chat: bool, text: str) -> dict:
        """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: the legacy parallel lists (an
        echoed prompt's first token with logprob and top_logprobs null: nothing precedes it)."""
        def entry(token: int, logprob: float) -> dict:
            piece = self._piece(token)
            return {"token": piece["token"], "logprob": logprob, "bytes": piece["bytes"]}

        if chat:
            return {"content": [{**entry(lp["id"], lp["logprob"]),
                                 "top_logprobs": [entry(i, v) for i, v in lp["top"]]} for lp in logprobs]}
        tokens = [self._piece(lp["id"])["token"] for lp in logprobs]
        offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp["logprob"] for lp in logprobs],
                "top_logprobs": [None if lp["top"] is None else {self._piece(i)["token"]: v for i, v in lp["top"]}
                                 for lp in logprobs],
                "text_offset": offsets}


def _finish_reason(stop_type: str) -> str:
    return {"eos": "stop", "word": "stop", "limit": "length"}.get(stop_type, "stop")


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.generated),
            "total_tokens": len(req.prompt_ids) + len(req.generated),
            "prompt_tokens_details": {"cached_tokens": req.reused}}
