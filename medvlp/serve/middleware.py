"""ASGI middleware: a request-size limit that holds for chunked uploads too, and a log line per request.

The log line names the route template (``/v1/diagnose``), never the raw path, the query or a header: a client
may put anything there, keys and patient names included.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medvlp.serve.errors import ApiError, error_body

logger = logging.getLogger("medvlp.serve.access")

__all__ = ["BodyLimit", "RequestLog"]


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"the request is larger than the limit of {limit >> 20} MiB")


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Answer 413 for a body over ``max_bytes``: at once from ``Content-Length``, else while it streams in
    (the reader's :class:`ApiError` is answered by the app's handler)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await _send_json(send, 400, error_body("bad_request", "invalid Content-Length header"))
                return
            if n > self.max_bytes:
                err = BodyTooLarge(self.max_bytes)
                await _send_json(send, 413, error_body(err.code, err.message))
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class RequestLog:
    """One INFO line per request: id, method, route template, status, milliseconds. Adds ``X-Request-ID`` and
    ``Cache-Control: no-store`` (answers are about a patient's image) and ``X-Content-Type-Options: nosniff``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        status = 0

        async def tracking(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers") or [])
                headers += [(b"x-request-id", rid.encode()), (b"x-content-type-options", b"nosniff")]
                if scope["path"].startswith("/v1/"):
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        finally:
            route = scope.get("route")
            where = getattr(route, "path", None) or "(no route)"
            ms = (time.perf_counter() - t0) * 1000.0
            logger.info("%s %s %s %d %.1f ms", rid, scope.get("method", "?"), where, status, ms)
