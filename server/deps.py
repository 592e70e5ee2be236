"""Request dependencies as Annotated aliases: routes list `session: SessionDep` and friends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.auth import Tokens, token_matches
from server.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="`paratrain serve` prints the token; it is in <data_dir>/token.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


def _tokens(request: Request) -> Tokens:
    return request.app.state.tokens


def _unauthorized() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                         headers={"WWW-Authenticate": "Bearer"})


def require_user(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if credentials is None or not token_matches(credentials.credentials, _tokens(request).user):
        raise _unauthorized()


def require_worker(request: Request,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if credentials is None or not token_matches(credentials.credentials, _tokens(request).worker):
        raise _unauthorized()


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
UserAuth = Depends(require_user)
WorkerAuth = Depends(require_worker)
