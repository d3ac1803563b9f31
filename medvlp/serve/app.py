"""The FastAPI application: versioned JSON endpoints under ``/v1``, the viewer at ``/``, OpenAPI at ``/openapi.json``.

Routes are thin: they check the key, turn the request into a job (an upload saved under a temporary folder, or a
series pulled over DICOMweb) and await its result from the micro-batcher, which runs the model in one thread.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from medvlp import __version__
from medvlp.hospital import results as hospital
from medvlp.serve.auth import KeyRing
from medvlp.serve.batching import MicroBatcher
from medvlp.serve.dicomweb import DicomWebConfig, fetch_series
from medvlp.serve.errors import ERROR_RESPONSES, ApiError, install_error_handlers
from medvlp.serve.middleware import AuthGate, BodyLimit, RequestLog
from medvlp.serve.schemas import (
    DiagnoseJSON,
    DiagnoseOptions,
    DiagnoseResponse,
    EmbedResponse,
    EmbedText,
    HealthResponse,
    ModelResponse,
    RetrieveRequest,
    RetrieveResponse,
    ScoreJSON,
    ScoreOptions,
    ScoreResponse,
)
from medvlp.serve.service import DiagnosisService, ImageJob, PreparedImage, TextJob
from medvlp.serve.uploads import UploadLimits, cleanup, save_upload

logger = logging.getLogger(__name__)

__all__ = ["ServeSettings", "create_app"]

STATIC = Path(__file__).resolve().parent / "static"
FORM_SLACK = 1 << 20  # room for the form's other fields and multipart framing beyond the file itself
# JSON bodies are small: what the largest valid request of each endpoint needs, with room for escapes
JSON_LIMITS = {"retrieve": 16 << 10, "diagnose": 16 << 10, "embed": 1 << 20, "score": 64 << 10}


@dataclass(frozen=True)
class ServeSettings:
    """How the server behaves. ``api_keys`` empty means no authentication (``--no-auth``, loopback only)."""

    api_keys: tuple[str, ...] = ()
    limits: UploadLimits = field(default_factory=UploadLimits)
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    dicomweb: DicomWebConfig = field(default_factory=DicomWebConfig)
    body_timeout: float = 60.0  # seconds for a whole request body to arrive (408 beyond)
    max_decoding: int = 2  # uploads decoded at once (each may cost up to limits.max_decoded bytes)


_FORM_FIELDS: dict[str, dict[str, Any]] = {
    "diagnose": {
        "findings": {"type": "string", "description": "comma-separated; omitted: the model's own findings"},
        "heatmaps": {"type": "boolean", "default": False},
        "top_k": {"type": "integer", "minimum": 0, "maximum": 50, "default": 0},
    },
    "embed": {},
    "score": {"texts": {"type": "string", "description": "a JSON array of the sentences to score"}},
}


def _multipart_schema(route: str) -> dict[str, Any]:
    props: dict[str, Any] = {"file": {"type": "string", "format": "binary", "description": "DICOM, zip, NIfTI, PNG"}}
    required = ["file", *(["texts"] if route == "score" else [])]
    return {"type": "object", "required": required, "properties": props | _FORM_FIELDS[route]}


def _body(multipart: dict[str, Any], json_model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
            },
        }
    }


def _invalid(exc: ValidationError, where: str) -> ApiError:
    e = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
    loc = ".".join(str(p) for p in (where, *e["loc"]) if p != "")
    return ApiError(422, "validation_error", f"{loc}: {e['msg']}")


async def _read_json(request: Request, model: type[BaseModel], limit: int, where: str = "body") -> Any:
    """Read a JSON body of at most ``limit`` bytes and validate it off the event loop.

    Raises:
        ApiError: 413 beyond ``limit`` (from ``Content-Length`` before reading, or while reading), 422 invalid.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"a JSON body here is at most {limit >> 10} KiB")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "payload_too_large", f"a JSON body here is at most {limit >> 10} KiB")
    try:
        return await run_in_threadpool(model.model_validate_json, bytes(data))
    except ValidationError as exc:
        raise _invalid(exc, where) from exc


async def _read_form(request: Request) -> tuple[UploadFile, dict[str, Any]]:
    form = await request.form(max_files=1, max_fields=8, max_part_size=64 << 10)
    fields = {k: v for k, v in form.multi_items() if k != "file"}
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "validation_error", "file: a multipart 'file' upload is required")
    if any(not isinstance(v, str) for v in fields.values()):
        raise ApiError(422, "validation_error", "only 'file' may be a file")
    return upload, fields


def create_app(service: DiagnosisService, settings: ServeSettings) -> FastAPI:
    """The application around a loaded :class:`DiagnosisService`."""
    keys = KeyRing(settings.api_keys)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvlp-model")
    batch = dict(executor=executor, max_batch=settings.max_batch, max_wait_ms=settings.batch_wait_ms)
    images = MicroBatcher(service.run_images, max_queue=settings.max_queue, name="images", **batch)
    texts = MicroBatcher(service.run_texts, max_queue=settings.max_queue, name="texts", **batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        images.start()
        texts.start()
        yield
        await images.stop()
        await texts.stop()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="medvlp",
        version=__version__,
        summary="Zero-shot diagnosis, grounding, embedding and retrieval with a medvlp model.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load its scripts from a CDN; the spec is at /openapi.json
        redoc_url=None,
    )
    app.state.service, app.state.images, app.state.texts, app.state.keys = service, images, texts, keys
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_bytes + FORM_SLACK, timeout=settings.body_timeout)
    app.add_middleware(AuthGate, keys=keys)  # outside BodyLimit: no byte of a body is read before the key is checked
    app.add_middleware(RequestLog)
    auth = [Depends(keys.require)]
    limits = settings.limits
    decoding = asyncio.Semaphore(max(1, settings.max_decoding))

    async def prepare(job: ImageJob) -> PreparedImage:
        service.check_job(job)
        async with decoding:  # a few decodes at a time: each may cost up to limits.max_decoded
            try:
                return await run_in_threadpool(service.prepare, job, limits)
            except ApiError:
                raise
            except Exception as exc:  # a decoder failing in a way the reader does not foresee: this upload alone
                logger.warning("upload could not be decoded: %s", type(exc).__name__)
                raise ApiError(422, "unreadable_image", f"the image cannot be decoded ({type(exc).__name__})") from exc

    async def read_image_request(
        request: Request, options: type[BaseModel], json_model: type[BaseModel], limit: int
    ) -> tuple[Any, Path, Path, bool]:
        """An image request's options, the image's path in a new work folder (removed again on any error), and
        whether the image was pulled over DICOMweb (a JSON body) rather than uploaded (multipart ``file``)."""
        workdir = Path(tempfile.mkdtemp(prefix="medvlp-serve-"))
        try:
            ctype = request.headers.get("content-type", "").lower()
            if ctype.startswith("multipart/form-data"):
                upload, fields = await _read_form(request)
                try:
                    opts = options.model_validate(fields)
                except ValidationError as exc:
                    raise _invalid(exc, "") from exc
                return opts, await run_in_threadpool(save_upload, upload.file, workdir, limits), workdir, False
            if ctype.startswith("application/json"):
                opts = await _read_json(request, json_model, limit)
                src = opts.dicomweb
                path = await fetch_series(src.url, src.study, src.series, workdir / "series", settings.dicomweb, limits)
                return opts, path, workdir, True
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data (file) or application/json")
        except BaseException:
            await run_in_threadpool(cleanup, workdir)
            raise

    async def run_image(job: ImageJob) -> tuple[dict[str, Any], int]:
        try:
            # decoded and brought to the model's size before joining the queue: no full-size image waits there
            job.prepared = await prepare(job)
            await run_in_threadpool(cleanup, job.workdir)
            return await images.submit(job)
        finally:
            await run_in_threadpool(cleanup, job.workdir)

    @app.get("/", include_in_schema=False)
    async def viewer() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": _CSP})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/health", response_model=HealthResponse, tags=["meta"])
    async def health() -> dict[str, Any]:
        """Liveness: no key needed."""
        return {"status": "ok", "version": __version__}

    @app.get("/v1/model", response_model=ModelResponse, dependencies=auth, responses=ERROR_RESPONSES, tags=["meta"])
    async def model_info() -> dict[str, Any]:
        """The model card summary (cohort, findings, headline metrics) and the model's configuration."""
        info = service.describe()
        info["serving"] = {
            "micro_batching": images.enabled,
            "max_batch": settings.max_batch,
            "batch_wait_ms": settings.batch_wait_ms,
            "max_upload_mb": round(limits.max_bytes / (1 << 20), 3),
            "authentication": keys.enabled,
            "dicomweb": bool(settings.dicomweb.allow),
            "prompt_cache": service.prompt_cache_info(),
        }
        return info

    @app.post(
        "/v1/diagnose",
        response_model=DiagnoseResponse,
        response_model_exclude_none=True,
        dependencies=auth,
        responses=ERROR_RESPONSES,
        openapi_extra=_body(_multipart_schema("diagnose"), DiagnoseJSON),
        tags=["diagnosis"],
    )
    async def diagnose(request: Request) -> Any:
        """Zero-shot finding probabilities for one image: an upload (multipart ``file``) or a DICOMweb series
        (JSON ``{"dicomweb": {"url", "study", "series"}}``); optional heatmaps and similar training reports."""
        fmt, sources = hospital.answer_format(request), None
        opts, path, workdir, pulled = await read_image_request(
            request, DiagnoseOptions, DiagnoseJSON, JSON_LIMITS["diagnose"]
        )
        if pulled:
            try:
                sources = await hospital.sources_for_store(opts, path)
            except BaseException:
                await run_in_threadpool(cleanup, workdir)
                raise
        job = ImageJob(path, workdir, opts.findings, opts.heatmaps, opts.top_k, peaks=sources is not None)
        answer, size = await run_image(job)
        return await hospital.finish({**answer, "batch_size": size}, opts, sources, fmt, service, settings.dicomweb)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        dependencies=auth,
        responses=ERROR_RESPONSES,
        openapi_extra=_body(_multipart_schema("score"), ScoreJSON),
        tags=["diagnosis"],
    )
    async def score(request: Request) -> dict[str, Any]:
        """Sentences scored against one image (an upload, or a DICOMweb series as in ``/v1/diagnose``): the pair
        score the robustness suite ranks by, with the model's side check where it has one ("left" read against
        where the finding is on the image), so a sentence can be compared with its negated or side-swapped twin."""
        opts, path, workdir, _ = await read_image_request(request, ScoreOptions, ScoreJSON, JSON_LIMITS["score"])
        answer, size = await run_image(ImageJob(path, workdir, texts=opts.texts))
        return {**answer, "side_check": service.side_check, "batch_size": size}

    @app.post(
        "/v1/embed",
        response_model=EmbedResponse,
        dependencies=auth,
        responses=ERROR_RESPONSES,
        openapi_extra=_body(_multipart_schema("embed"), EmbedText),
        tags=["embedding"],
    )
    async def embed(request: Request) -> dict[str, Any]:
        """An image (multipart ``file``) or texts (JSON ``{"texts": [...]}``) -> L2-normalized embeddings."""
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("application/json"):
            body = await _read_json(request, EmbedText, JSON_LIMITS["embed"])
            out, size = await texts.submit(TextJob(body.texts))
            return {"kind": "text", **out, "batch_size": size}
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data (file) or application/json")
        workdir = Path(tempfile.mkdtemp(prefix="medvlp-serve-"))
        try:
            upload, fields = await _read_form(request)
            if fields:
                raise ApiError(422, "validation_error", f"unexpected field(s): {', '.join(sorted(fields))}")
            path = await run_in_threadpool(save_upload, upload.file, workdir, limits)
        except BaseException:
            await run_in_threadpool(cleanup, workdir)
            raise
        out, size = await run_image(ImageJob(path, workdir, embed_only=True))
        return {"kind": "image", **out, "batch_size": size}

    @app.post(
        "/v1/retrieve",
        response_model=RetrieveResponse,
        dependencies=auth,
        responses=ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RetrieveRequest"}}},
            }
        },
        tags=["retrieval"],
    )
    async def retrieve(request: Request) -> dict[str, Any]:
        """The training studies closest to a text: by their images (``against: images``) or their reports.
        Studies are named by their pseudonymous ids (``st-...``)."""
        ctype = request.headers.get("content-type", "").lower()
        if not ctype.startswith("application/json"):
            raise ApiError(415, "unsupported_media_type", "send application/json")
        body = await _read_json(request, RetrieveRequest, JSON_LIMITS["retrieve"])
        if service.corpus is None:
            raise ApiError(409, "retrieval_unavailable", "this server has no report corpus (start it with --cohort)")
        out, _ = await texts.submit(TextJob([body.text], k=body.k, against=body.against))
        return {"against": body.against, **out}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (DiagnoseJSON, EmbedText, RetrieveRequest, ScoreJSON):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(js.pop("$defs", {}))
                schemas[model.__name__] = js
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in spec["paths"].items():
                for op in ops.values():
                    if path != "/v1/health":
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
