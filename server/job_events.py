"""A job's history as clients see it: every state change goes through `set_state` (the allowed-transition
table) and appends an event in the same transaction as the change, and so do log lines and metrics, so the
SSE stream and the tables never disagree. Callers commit."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, event
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, col, select

from server.errors import Conflict
from server.models import (
    ALLOWED_TRANSITIONS,
    FINAL_STATES,
    EventKind,
    Job,
    JobEvent,
    JobNode,
    JobPublic,
    JobState,
    LogLine,
    reason_in_one_line,
    utcnow,
)


SERVER_LOG_ATTEMPT = 0  # log lines written by the server itself (re-queues, releases)
log = logging.getLogger("paratrain.server")


# --- the operator's log: what happened to jobs and workers, written once the change is committed ----------------
def note(session: Session, message: str) -> None:
    """A line for the server's log, written if and when this transaction commits (a change rolled back, e.g.
    a claim that lost a race, did not happen)."""
    session.info.setdefault("paratrain_notes", []).append(message)


@event.listens_for(OrmSession, "after_commit")
def _write_notes(session: OrmSession) -> None:
    for message in session.info.pop("paratrain_notes", []):
        log.info("%s", message)


@event.listens_for(OrmSession, "after_rollback")
def _drop_notes(session: OrmSession) -> None:
    session.info.pop("paratrain_notes", None)


def job_label(job: Job) -> str:
    return f"job {job.id} ({job.name})" if job.name else f"job {job.id}"


def emit(session: Session, job: Job, kind: EventKind, data: dict[str, Any]) -> None:
    job.last_event_id += 1
    session.add(JobEvent(job_id=job.id, id=job.last_event_id, kind=kind, data=data))


def emit_state(session: Session, job: Job) -> None:
    session.flush()
    emit(session, job, EventKind.state, JobPublic.model_validate(job, from_attributes=True).model_dump(mode="json"))


def add_log(session: Session, job: Job, line: str, *, attempt: int, idx: int) -> None:
    seq = job.log_count
    job.log_count += 1
    session.add(LogLine(job_id=job.id, seq=seq, attempt=attempt, idx=idx, line=line))
    emit(session, job, EventKind.log, {"seq": seq, "line": line})


def server_log(session: Session, job: Job, line: str, *, operator_log: bool = True) -> None:
    """A line of the server's in the job's log, and in the operator's log unless the state change that
    follows says it there already."""
    add_log(session, job, f"[paratrain] {line}", attempt=SERVER_LOG_ATTEMPT, idx=job.log_count)
    if operator_log:
        note(session, f"{job_label(job)}: {line}")


def set_state(session: Session, job: Job, state: JobState) -> None:
    if state not in ALLOWED_TRANSITIONS[job.state]:
        raise Conflict(f"job {job.id} is {job.state.value}; it cannot become {state.value}")
    before, job.state = job.state, state
    note(session, f"{job_label(job)}: {before.value} -> {state.value}" + _state_detail(job))
    if state in FINAL_STATES:
        job.finished_at = utcnow()
        job.lease_expires_at = None
    if state == JobState.queued or state in FINAL_STATES:  # a re-queued gang is formed anew
        session.exec(delete(JobNode).where(JobNode.job_id == job.id))  # type: ignore[arg-type]
    emit_state(session, job)


def _state_detail(job: Job) -> str:
    # (a job starts running in the claim's UPDATE, whose own server_log line says where)
    why = reason_in_one_line(job.failure_reason, limit=200)
    if job.state in (JobState.failed, JobState.cancelled) and why:
        return f" ({job.failure_class.value if job.failure_class else '?'}: {why})"
    return ""


def list_events(*, session: Session, job_id: int, after: int, limit: int = 500) -> list[JobEvent]:
    stmt = (select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(col(JobEvent.id)).limit(limit))
    return list(session.exec(stmt))
