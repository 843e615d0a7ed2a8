"""Request bodies are bounded before anything reads them: 413 beyond the route's limit.

A pure ASGI middleware (no BaseHTTPMiddleware, no buffering of the excess):

- ``Content-Length`` above the limit: 413 at once, the body is never read;
- no ``Content-Length`` (chunked): the body is read up to the limit; one byte more and the answer is 413,
  the rest is never read;
- otherwise the body read so far is handed to the app unchanged.

413 answers carry ``Connection: close``, so the server drops the connection instead of draining the rest.

Limits are per route: ``{"POST /users/login": 16_384}`` (method and path template as declared in the app),
anything else gets the default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .request_id import get_request_id

DEFAULT_MAX_BODY_BYTES = 64 * 1024
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, *, default: int = DEFAULT_MAX_BODY_BYTES, limits: Mapping[str, int] | None = None
    ) -> None:
        self.app, self.default = app, default
        # "POST /orders/{order_id}/cancel" -> (method, compiled path template, limit)
        self.limits: list[tuple[str, re.Pattern[str], int]] = []
        for route, limit in (limits or {}).items():
            method, _, path = route.strip().partition(" ")
            self.limits.append((method.upper(), compile_path(path.strip())[0], limit))

    def limit_for(self, scope: Scope) -> int:
        for method, pattern, limit in self.limits:
            if scope["method"] == method and pattern.match(scope["path"]):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] in _BODYLESS and not _declares_body(scope)):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, limit)
            return
        # Read up to limit + 1 bytes; never more.
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _declares_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "detail": f"Request body larger than {limit} bytes",
            "code": "payload_too_large",
            "request_id": get_request_id(),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
