"""ASGI middleware: the key check before any byte of a body is read, a request-size limit that holds for chunked
uploads too, a deadline for the whole body, and one log line per request.

The log line names the route template (``/v1/diagnose``), never the raw path, the query or a header: a client
may put anything there, keys and patient names included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import uuid
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medvlp.serve.auth import KeyRing
from medvlp.serve.errors import ApiError, error_body

logger = logging.getLogger("medvlp.serve.access")
errors_logger = logging.getLogger("medvlp.serve.errors")

__all__ = ["AuthGate", "BodyLimit", "RequestLog"]

DISCONNECTED = 499  # the status logged for a client that went away before its answer (nginx's convention)
OPEN_PATHS = ("/v1/health",)  # the only API route answered without a key


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"the request is larger than the limit of {limit >> 20} MiB")


async def _send_json(
    send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class BodyTimeout(ApiError):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, "request_timeout", f"the request body did not arrive within {seconds:g} s")


class AuthGate:
    """401 for an API request without a valid key, answered from the headers before any body byte is read (so a
    request without a key costs nothing, whatever it sends). The viewer, its static files, the OpenAPI document and
    ``/v1/health`` stay open."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not self.keys.enabled or not path.startswith("/v1/") or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip() and self.keys.check(token.strip()):
            await self.app(scope, receive, send)
            return
        message = "invalid API key" if token.strip() else "missing API key: send 'Authorization: Bearer <key>'"
        await _send_json(send, 401, error_body("unauthorized", message), [(b"www-authenticate", b"Bearer")])


class BodyLimit:
    """Answer 413 for a body over ``max_bytes``: at once from ``Content-Length``, else while it streams in; and 408
    for a body not complete ``timeout`` seconds after the request began (a client trickling bytes holds nothing
    longer). The reader's :class:`ApiError` is answered by the app's handler."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 60.0) -> None:
        if timeout <= 0:
            raise ValueError(f"the body timeout must be positive, got {timeout}")
        self.app, self.max_bytes, self.timeout = app, int(max_bytes), float(timeout)

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
        deadline = time.monotonic() + self.timeout
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what is left to receive is the disconnect, waited for without a deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError as exc:
                raise BodyTimeout(self.timeout) from exc
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
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

        disconnected = False

        async def watching() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected |= message["type"] == "http.disconnect"
            return message

        try:
            await self.app(scope, watching, tracking)
        except Exception as exc:  # every failure ends here, answered and logged once
            if disconnected or isinstance(exc, ClientDisconnect):
                status = DISCONNECTED
            else:
                # the type and the frames, never the message: it may quote a header value or a file name
                frames = "".join(traceback.format_tb(exc.__traceback__))
                errors_logger.error("%s internal error: %s\n%s", rid, type(exc).__name__, frames)
                if status == 0:
                    try:
                        await _send_json(tracking, 500, error_body("internal_error", "internal server error"))
                    except Exception:  # the client is gone: nothing more to tell it
                        status = DISCONNECTED
                else:
                    status = 500 if status < 500 else status
        finally:
            route = scope.get("route")
            where = getattr(route, "path", None) or "(no route)"
            ms = (time.perf_counter() - t0) * 1000.0
            note = " client disconnected" if status == DISCONNECTED else ""
            logger.info("%s %s %s %d %.1f ms%s", rid, scope.get("method", "?"), where, status, ms, note)
