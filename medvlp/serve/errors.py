"""One error shape for every failure the API answers: ``{"error": {"code": ..., "message": ...}}``.

Handlers turn :class:`ApiError`, FastAPI's validation errors (422), Starlette's HTTP errors (404, 405, 400 from the
multipart parser...) and anything unexpected into that shape. An unexpected exception is logged by type only (its
message may quote a header or a file) and answered with a generic 500: every expected bad input is an
:class:`ApiError` with a 4xx status before it reaches there.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

__all__ = ["ERROR_RESPONSES", "ApiError", "error_body", "install_error_handlers"]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "unavailable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    424: "dicomweb_failed",
    429: "too_many_requests",
}


class ApiError(Exception):
    """A request the API refuses, with its HTTP status, a stable machine-readable code and a message for people.

    Messages never quote a file name, a path or a DICOM header value from the request.
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
        }
    },
}
# Documented on every route, so the OpenAPI spec (and a fuzzer reading it) knows the error answers.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": desc, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for status, desc in (
        (400, "Malformed request"),
        (401, "Missing or invalid API key"),
        (403, "Not allowed (DICOMweb server not in the allow-list)"),
        (404, "Not found"),
        (409, "Feature unavailable for this model (no retrieval corpus)"),
        (413, "Upload larger than the server's limit"),
        (415, "Unsupported content type"),
        (422, "Invalid input: validation error, unreadable image, wrong dimensionality"),
        (424, "The DICOMweb server could not be reached or did not answer as expected"),
    )
}


def _validation_details(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        out.append({"loc": loc, "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the ``{"error": {...}}`` shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(list(exc.errors()))
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"][1:] if len(first["loc"]) > 1 else first["loc"])
        msg = f"{where}: {first['msg']}" if where else first["msg"]
        return JSONResponse(error_body("validation_error", msg, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(code).replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
        status = exc.status_code if exc.status_code < 500 else 500
        return JSONResponse(error_body(code, message), status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the type and the frames, never the message: it may quote a header value or a file name
        frames = "".join(traceback.format_tb(exc.__traceback__))
        logger.error("internal error on %s %s: %s\n%s", request.method, request.url.path, type(exc).__name__, frames)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
