"""Request dependencies as Annotated aliases: routes list `session: SessionDep` and friends."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.auth import Tokens, token_matches
from server.errors import FieldError
from server.models import MAX_DB_INT
from server.settings import Settings
from trainer_core.config import closest_name

log = logging.getLogger("paratrain.server")

_bearer = HTTPBearer(auto_error=False, description="`paratrain serve` prints the token; it is in <data_dir>/token.")


class ErrorMessage(BaseModel):
    detail: str


# The answers a route may give besides its own and a 422, for the OpenAPI schema (clients generated from it
# need not guess). Every answer of these codes is {"detail": "..."}.
ERROR_ANSWERS = {
    401: "No bearer token, or a wrong one.",
    404: "No such job or worker (or no such artifact).",
    409: "The job's or the worker's state forbids it now; the detail says why.",
    410: "Another worker process registered under this worker's name since: this one stops.",
    413: "The body is larger than PARATRAIN_MAX_BODY_MB.",
    503: "The server cannot write its database (disk full, permissions); nothing stored was lost.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: these error answers, described."""
    return {code: {"model": ErrorMessage, "description": ERROR_ANSWERS[code]} for code in codes}


def app_settings(request: Request) -> Settings:
    """The settings the app was created with (server.settings.get_settings reads the environment)."""
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


# Async generators on purpose: their teardown (closing the session, which ends any open transaction)
# runs on the event loop. A sync one would need a threadpool thread, and under load every thread can be
# waiting for the write lock that the unclosed session still holds.
async def get_session(request: Request) -> AsyncIterator[Session]:
    """For reads: no lock is taken (WAL); nothing expires on commit, so answers never re-query."""
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


async def get_write_session(request: Request) -> AsyncIterator[Session]:
    """For routes that write: the transaction holds SQLite's write lock from its first statement."""
    with Session(request.app.state.write_engine, expire_on_commit=False) as session:
        yield session


async def reject_unknown_query_params(request: Request) -> None:
    """A misspelt query parameter (`?stat=running`) would be ignored, and the answer would silently be
    for something else: a 422 names it. The known ones are those of the route and its dependencies."""
    route = request.scope.get("route")
    # The bearer is read here, not declared as a dependency: that would mark /api/health as needing a token.
    credentials = await _bearer(request)
    tokens = _tokens(request)
    if not hasattr(route, "dependant") or not (_holds(credentials, tokens.user) or _holds(credentials, tokens.worker)):
        return   # (a request without a valid token gets its 401 from the route's auth, and learns nothing)
    known = _query_params(route.dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        close = closest_name(unknown[0], known)
        hint = f"did you mean {close!r}?" if close else f"known: {', '.join(sorted(known)) or 'none'}"
        raise FieldError(("query", unknown[0]), f"unknown query parameter; {hint}")


def _query_params(dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_params(sub)
    return names


def _tokens(request: Request) -> Tokens:
    return request.app.state.tokens


def _unauthorized() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                         headers={"WWW-Authenticate": "Bearer"})


def _holds(credentials: HTTPAuthorizationCredentials | None, token: str) -> bool:
    return credentials is not None and token_matches(credentials.credentials, token)


def require_user(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if not _holds(credentials, _tokens(request).user):
        raise _unauthorized()


def once_a_minute(app_state: Any, key: str) -> bool:
    """Whether a log line of kind `key` may be written now: at most one a minute per app, for errors a client
    repeats in a loop (a worker retrying, every request on a full disk)."""
    now, last = time.monotonic(), getattr(app_state, key, None)
    if last is not None and now - last <= 60:
        return False
    setattr(app_state, key, now)
    return True


def require_worker(request: Request,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if not _holds(credentials, _tokens(request).worker):
        # A worker with the wrong token keeps retrying: the operator should learn of it here, once a minute.
        if once_a_minute(request.app.state, "refused_worker_logged"):
            log.warning("refused a worker call with %s token from %s (%s %s): give that worker this server's "
                        "worker token (<data_dir>/worker_token, or PARATRAIN_WORKER_TOKEN where that is set)",
                        "a wrong" if credentials else "no",
                        request.client.host if request.client else "?", request.method, request.url.path)
        raise _unauthorized()


# SQLite (and PostgreSQL BIGINT) integers are 64-bit: a larger id is a 422, not a server error.
JobIdPath = Annotated[int, Path(ge=0, le=MAX_DB_INT)]
WorkerIdPath = Annotated[int, Path(ge=0, le=MAX_DB_INT)]

SettingsDep = Annotated[Settings, Depends(app_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
WriteSessionDep = Annotated[Session, Depends(get_write_session)]
UserAuth = Depends(require_user)
WorkerAuth = Depends(require_worker)
