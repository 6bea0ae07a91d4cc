"""Which browser pages on other origins may call the server (CORS), as llama.cpp's server decides it.

An allowed origin is named back in Access-Control-Allow-Origin with credentials allowed, and a preflight
(OPTIONS) is answered 200 without an API key; a page on another origin gets the same 200 preflight without
the header, so the browser refuses it. Starlette's CORS middleware answers that case 400 and cannot name
credentials for any origin, hence this one. Unlike llama.cpp (which answers "*"), a preflight is allowed the
headers it asks for: browsers never let "*" cover Authorization. Header names are written as llama.cpp writes
them (uvicorn's h11 sends every name in lower case; its httptools keeps them).
"""
from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """allowed: "*" (any origin), "localhost" (http(s) pages on this machine's loopback names, any port), or
    origins named exactly (scheme://host[:port])."""
    if "*" in allowed or origin in allowed:
        return True
    parts = urlsplit(origin)
    return "localhost" in allowed and parts.scheme in ("http", "https") and parts.hostname in LOOPBACK_HOSTS


class CORS:
    def __init__(self, app: ASGIApp, origins: tuple[str, ...]):
        self.app, self.origins = app, origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        origin = headers.get("origin") if headers is not None else None
        if origin is None:
            return await self.app(scope, receive, send)
        allowed = origin_allowed(origin, self.origins)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            answer = {"Vary": "Origin"}
            if allowed:
                answer.update(self._allow(origin), **{"Access-Control-Allow-Methods": ALLOW_METHODS,
                                                     "Access-Control-Allow-Headers":
                                                         headers.get("access-control-request-headers", "*"),
                                                     "Access-Control-Max-Age": "600"})
            await send({"type": "http.response.start", "status": 200,
                        "headers": _raw({**answer, "Content-Length": "0"})})
            return await send({"type": "http.response.body", "body": b""})
        if not allowed:
            return await self.app(scope, receive, send)

        async def send_allowed(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *_raw({**self._allow(origin), "Vary": "Origin"})]}
            await send(message)

        await self.app(scope, receive, send_allowed)

    @staticmethod
    def _allow(origin: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
