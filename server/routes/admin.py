"""Read-only checks for whoever holds the user token."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from server.deps import SessionDep, UserAuth, error_responses
from server.integrity import check_integrity

router = APIRouter(tags=["admin"], dependencies=[UserAuth], responses=error_responses(401))


class IntegrityPublic(BaseModel):
    ok: bool
    problems: list[str]


@router.get("/integrity", response_model=IntegrityPublic)
def integrity(session: SessionDep) -> IntegrityPublic:
    """The database's invariants (server/integrity.py) and SQLite's own integrity check."""
    problems = check_integrity(session)
    return IntegrityPublic(ok=not problems, problems=problems)
