"""The FastAPI application: `create_app(settings)` builds everything; nothing happens at import."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import queue
from server.auth import ensure_tokens
from server.db import init_db, make_engine, write_engine
from server.deps import once_a_minute, reject_unknown_query_params
from server.errors import Conflict, FieldError, NotFound, Superseded
from server.limits import BodySizeLimit
from server.models import utcnow
from server.routes import admin, configs, estimate, jobs, streams, workers
from server.settings import Settings, get_settings
from trainer_core.checkpoint import FULL_DISK_BYTES

log = logging.getLogger("paratrain.server")
# What SQLite says when it cannot write: the operator's to fix (disk, permissions), not a bug of ours.
STORAGE_ERRORS = ("database or disk is full", "disk I/O error", "attempt to write a readonly database",
                  "unable to open database file")


def reap_once(engine: Engine, settings: Settings) -> list[int]:
    """Re-queues jobs whose lease expired (returned) and releases stale multi-node reservations."""
    with Session(write_engine(engine)) as session:
        now = utcnow()
        requeued = queue.requeue_expired(session=session, now=now)
        released = queue.release_stale_reservations(session=session, now=now, settings=settings)
        session.commit()
    if released:
        log.warning("reservations released for multi-node jobs %s", released)
    return requeued


async def _reaper(engine: Engine, settings: Settings) -> None:
    while True:
        try:
            lost = await anyio.to_thread.run_sync(reap_once, engine, settings)
            if lost:
                log.warning("leases expired for jobs %s", lost)
        except Exception:  # a locked or briefly unavailable DB must not end the reaper
            log.exception("reaper step failed")
        await anyio.sleep(settings.reaper_interval_s)


def _add_exception_handlers(app: FastAPI) -> None:
    def detail_handler(status_code: int):
        async def handler(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status_code)
        return handler

    for error, status_code in ((NotFound, status.HTTP_404_NOT_FOUND), (Conflict, status.HTTP_409_CONFLICT),
                               (Superseded, status.HTTP_410_GONE)):
        app.add_exception_handler(error, detail_handler(status_code))

    @app.exception_handler(FieldError)
    async def _field_error(_: Request, exc: FieldError) -> JSONResponse:
        detail = [{"loc": list(exc.loc), "msg": exc.msg, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, except that a refused NaN/Infinity is echoed as text: JSON has no such numbers
        detail = _json_safe(jsonable_encoder(exc.errors()))
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        declared_json = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
        if request.method in ("POST", "PUT", "PATCH") and not declared_json:
            for error in detail:   # FastAPI reads a body that is not declared JSON as a string
                if error.get("loc") == ["body"] and error.get("type") in ("model_attributes_type", "dict_type"):
                    error["msg"] = (f"a JSON object was expected, sent as Content-Type: application/json "
                                    f"(this request's: {content_type or 'none'})")
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's bare "There was an error parsing the body": say what is wrong, as for other bad JSON
            detail = [{"loc": ["body"], "type": "json_invalid",
                       "msg": f"not UTF-8 text (byte {exc.__cause__.start}): JSON bodies are UTF-8"}]
            return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
            detail = [{"loc": ["body"], "type": "json_invalid", "msg": "JSON nested too deeply to read"}]
            return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
        return await http_exception_handler(request, exc)

    @app.exception_handler(OperationalError)
    async def _storage_error(request: Request, exc: OperationalError) -> JSONResponse:
        cause = next((m for m in STORAGE_ERRORS if m in str(exc.orig)), None)
        if cause is None:
            return await _unexpected(request, exc)
        message = f"the server cannot write its database ({cause}): free space or fix the permissions of " \
                  f"{app.state.settings.data_dir}; nothing stored was lost"
        if once_a_minute(app.state, "storage_error_logged"):   # not two tracebacks a request
            log.error("%s (%s %s)", message, request.method, request.url.path)
        return JSONResponse({"detail": message}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error"}, status_code=500)  # no traceback leaves


def _json_safe(value: Any) -> Any:
    """A refused input as JSON can echo it: NaN and Infinity as text, a lone UTF-16 surrogate (JSON's "\\udcff",
    which UTF-8 cannot encode) as its escape."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    return value


# The method in a 32x32 icon: a main row over three branch columns of other lengths.
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
               '<rect width="32" height="32" rx="6" fill="#4f46e5"/>'
               '<rect x="5" y="5" width="22" height="5" rx="2" fill="#fff"/>'
               '<rect x="5" y="13" width="5" height="14" rx="2" fill="#fff"/>'
               '<rect x="13.5" y="13" width="5" height="9" rx="2" fill="#fff"/>'
               '<rect x="22" y="13" width="5" height="12" rx="2" fill="#fff"/></svg>')


def _mount_ui(app: FastAPI, settings: Settings) -> None:
    try:
        from ui.app import mount_ui

        mount_ui(app, settings.local_url)
    except Exception as e:  # absent or broken, the UI must not take the API down with it
        log.warning("UI not mounted: %s", e)
        return

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse("/ui")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # A data dir made here is the owner's alone: it holds every job's config, logs and outputs. One that
    # exists keeps its mode (an operator may share it on purpose).
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    init_db(engine)
    tokens = ensure_tokens(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with Session(write_engine(engine)) as session:
            queue.extend_all_leases(session=session, settings=settings)
            session.commit()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_reaper, engine, settings)
            yield
            tasks.cancel_scope.cancel()
        engine.dispose()

    app = FastAPI(title="paratrain", version="0.1.0", lifespan=lifespan,
                  description="Parallel-branch LoRA fine-tuning manager. Every /api route but /api/health "
                              "needs `Authorization: Bearer <token>`.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.write_engine = write_engine(engine)
    app.state.tokens = tokens
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_body_mb * 1024 * 1024))
    _add_exception_handlers(app)

    api = APIRouter(prefix="/api", dependencies=[Depends(reject_unknown_query_params)])

    @api.get("/health", tags=["health"], responses={503: {"description": "the data dir's disk is full"}})
    def health() -> JSONResponse:
        free = shutil.disk_usage(settings.data_dir).free
        # The trainer's threshold: under it SQLite refuses writes already, and checkpoints fail.
        if free < FULL_DISK_BYTES:
            # no path or size in the answer: /api/health needs no token; the log says it once a minute,
            # not once per poll of a load balancer
            if once_a_minute(app.state, "full_disk_logged"):
                log.error("the data dir's disk is full: %d KiB free in %s", free // 1024, settings.data_dir)
            return JSONResponse({"status": "disk full"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
        return JSONResponse({"status": "ok"})

    for module in (jobs, streams, workers, configs, estimate, admin):
        api.include_router(module.router)
    api.include_router(workers.agent_router)
    app.include_router(api)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:  # browsers ask for it on every page: a 404 in the console of the UI and /docs
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    if settings.mount_ui:
        _mount_ui(app, settings)
    return app
