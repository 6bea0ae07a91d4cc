"""llama.cpp's server endpoints: /completion, /tokenize, /detokenize, /apply-template, /props, /slots,
/health, /metrics, and the chat page at /. Fields and behaviours follow llama.cpp's server README."""
from __future__ import annotations

from typing import Any, AsyncIterator

from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .. import __version__
from ..tokenizer.chat import default_template, render_dialog
from .api import CHAT_PAGE, APIError, Handlers, _field, sampling_from, sse
from .engine import Request


class LlamaCppRoutes(Handlers):
    async def completion(self, request: HTTPRequest) -> Response:
        """One prompt, or several (a list of strings or of token lists: one result each, in order)."""
        body = await self._body(request)
        n_probs = _field(body, "n_probs", int, 0, lambda v: 0 <= v <= 100)
        reqs = [self._request(ids, body, openai=False, max_name="n_predict", top_logprobs=n_probs or None)
                for ids in self._prompts(body.get("prompt"))]
        for req in reqs:
            req.post_sampling = _field(body, "post_sampling_probs", bool, False)
        if _field(body, "stream", bool, False):
            if len(reqs) > 1:
                raise APIError(400, "Streaming takes one prompt; send several prompts without 'stream'.")
            events = self._events(reqs[0])
            return StreamingResponse(self._llamacpp_stream(reqs[0], events, body), media_type="text/event-stream")
        results = [self._llamacpp_final(text, req, done, body, i)
                   for i, (req, (text, done)) in enumerate(zip(reqs, await self._collect_all(reqs, request)))]
        return JSONResponse(results if len(results) > 1 else results[0])

    async def _llamacpp_stream(self, req: Request, events: AsyncIterator[dict], body: dict):
        async for e in events:
            if e["type"] == "token":
                chunk = {"index": 0, "content": e["text"], "tokens": e["tokens"], "stop": False, "id_slot": req.slot,
                         "tokens_predicted": len(req.generated), "tokens_evaluated": len(req.prompt_ids)}
                if e["logprobs"] is not None:
                    chunk["completion_probabilities"] = self._probabilities(e["logprobs"])
                if "timings" in e:
                    chunk["timings"] = e["timings"]
                yield sse(chunk)
            elif e["type"] == "progress":
                yield sse({"index": 0, "content": "", "tokens": [], "stop": False, "id_slot": req.slot,
                           "prompt_progress": e["prompt_progress"]})
            elif e["type"] == "error":
                yield sse({"error": {"message": e["message"], "type": "server_error"}})
            else:
                yield sse(self._llamacpp_final("", req, e, body, 0))

    def _llamacpp_final(self, text: str, req: Request, done: dict, body: dict, index: int) -> dict:
        result = {"index": index, "content": text,
                  "tokens": list(req.generated) if _field(body, "return_tokens", bool, True) else [],
                  "id_slot": req.slot, "stop": True, "model": self._model_name(body),
                  "tokens_predicted": len(req.generated), "tokens_evaluated": len(req.prompt_ids),
                  "generation_settings": self._settings(req), "has_new_line": "\n" in text,
                  "truncated": self.truncated(req), "stop_type": done["stop_type"],
                  "stopping_word": done["stopping_word"], "tokens_cached": req.reused, "timings": done["timings"],
                  "prompt": self.tokenizer.decode(req.prompt_ids)}
        if req.top_logprobs is not None:
            result["completion_probabilities"] = self._probabilities(req.logprobs)
        if _field(body, "verbose", bool, False):
            result["__verbose"] = self._verbose(req, text)
        fields = _field(body, "response_fields", list, None)
        return _pick(result, fields) if fields else result

    def _settings(self, req: Request) -> dict:
        p = req.params
        return {"n_ctx": self.engine.model.n_ctx, "n_predict": req.max_new_tokens, "seed": req.seed,
                "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
                "repeat_penalty": p.repeat_penalty, "repeat_last_n": p.repeat_last_n,
                "frequency_penalty": p.frequency_penalty, "presence_penalty": p.presence_penalty, "stop": req.stop_words,
                "n_probs": req.top_logprobs or 0, "model": self.state.model_name}

    def _probabilities(self, logprobs: list[dict]) -> list[dict]:
        """llama.cpp's completion_probabilities: each chosen token with its log-probability and the likeliest, or
        (post_sampling_probs) with its probability and the likeliest after the sampler's settings."""
        kind = "prob" if logprobs and "prob" in logprobs[0] else "logprob"
        top = {"prob": "top_probs", "logprob": "top_logprobs"}[kind]
        return [{**self._piece(lp["id"]), kind: lp[kind], top: [{**self._piece(i), kind: v} for i, v in lp["top"]]}
                for lp in logprobs]

    async def tokenize(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        content = _field(body, "content", str, None)
        if content is None:
            raise APIError(400, "'content' (a string) is required.")
        ids = self.tokenizer.encode(content, bos=_field(body, "add_special", bool, False))
        if _field(body, "with_pieces", bool, False):
            return JSONResponse({"tokens": [{"id": i, "piece": self.tokenizer.decode([i])} for i in ids]})
        return JSONResponse({"tokens": ids})

    async def detokenize(self, request: HTTPRequest) -> Response:
        body = await self._body(request)
        tokens = body.get("tokens")
        n = self.tokenizer.n_words
        if tokens is None or not all(isinstance(t, int) and 0 <= t < n for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids in 0..{n - 1}.")
        return JSONResponse({"content": self.tokenizer.decode(tokens)})

    async def apply_template(self, request: HTTPRequest) -> Response:
        """The prompt text the model's chat template makes of `messages` (what /v1/chat/completions would read)."""
        body = await self._body(request)
        try:
            return JSONResponse({"prompt": render_dialog(self._messages(body), self.tokenizer, strict=False,
                                                         continue_final=self._continue_final(body))})
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def props(self, request: HTTPRequest) -> Response:
        self._authorise(request)
        engine = self.engine
        defaults = sampling_from({}, openai=False, temperature=self.state.temperature)
        return JSONResponse({
            "default_generation_settings": {"n_ctx": engine.model.n_ctx, "n_predict": -1, "params": {
                "seed": self.state.seed, "temperature": defaults.temperature, "top_k": defaults.top_k, "top_p": defaults.top_p,
                "min_p": defaults.min_p, "repeat_penalty": defaults.repeat_penalty,
                "repeat_last_n": defaults.repeat_last_n, "frequency_penalty": defaults.frequency_penalty,
                "presence_penalty": defaults.presence_penalty, "n_predict": -1}},
            "total_slots": engine.max_batch, "model_path": self.state.model_path, "model_alias": self.state.model_name,
            "chat_template": default_template(self.tokenizer),
            "bos_token": self.tokenizer.token_text(self.tokenizer.bos_id),
            "eos_token": self.tokenizer.token_text(self.tokenizer.eos_id),
            "modalities": {"vision": False, "audio": False}, "build_info": f"llama-dist {__version__}"})

    async def slots(self, request: HTTPRequest) -> Response:
        self._authorise(request)
        if not self.state.slots_endpoint:
            raise APIError(501, "This server was started with --no_slots.", "not_supported_error")
        engine = self.engine
        running = dict(engine.running)
        return JSONResponse([{"id": slot, "n_ctx": engine.model.n_ctx, "is_processing": slot in running,
                              "next_token": {"n_decoded": len(running[slot].generated) if slot in running else 0}}
                             for slot in range(engine.max_batch)])

    async def health(self, request: HTTPRequest) -> Response:
        if self.state.engine is None:
            return APIError(503, "Loading model", "unavailable", "loading").response()
        engine = self.state.engine
        busy = len(engine.running)
        return JSONResponse({"status": "ok", "slots_idle": engine.max_batch - busy, "slots_processing": busy,
                             "requests_waiting": engine.queued()})

    async def metrics(self, request: HTTPRequest) -> Response:
        self._authorise(request)
        return Response(self.engine.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def page(self, request: HTTPRequest) -> Response:
        """The chat web page: a static, self-contained client of /v1/chat/completions."""
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))


def _pick(result: dict, fields: list[Any]) -> dict:
    """llama.cpp's response_fields: only the named fields, a/b naming b inside a (keys kept as written)."""
    picked = {}
    for name in fields:
        value: Any = result
        for part in str(name).split("/"):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            picked[str(name)] = value
    return picked
