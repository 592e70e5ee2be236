"""Server-Sent Events per job. Events are rows of JobEvent with a per-job increasing id, written in the
same transaction as the change they describe; a stream replays the rows after Last-Event-ID and then
polls for new ones, so a client that reconnects loses and repeats nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, status
from sqlalchemy.engine import Engine
from sqlmodel import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from server import crud
from server.job_events import list_events
from server.errors import NotFound
from server.deps import MAX_DB_INT, EngineDep, JobIdPath, SettingsDep, UserAuth, error_responses
from server.models import JobEvent, JobState

router = APIRouter(tags=["events"], dependencies=[UserAuth], responses=error_responses(401))


def _poll(engine: Engine, job_id: int, after: int) -> tuple[JobState | None, list[JobEvent]]:
    # State first, then events: if the state read is final, its event is already among the rows.
    with Session(engine) as session:
        try:
            state = crud.get_job(session=session, job_id=job_id).state
        except NotFound:  # deleted meanwhile
            return None, []
        return state, list_events(session=session, job_id=job_id, after=after)


async def _follow(engine: Engine, job_id: int, after: int, poll_s: float) -> AsyncIterator[ServerSentEvent]:
    while True:
        state, events = await anyio.to_thread.run_sync(_poll, engine, job_id, after)
        for event in events:
            yield ServerSentEvent(data=json.dumps(event.data, separators=(",", ":")), event=event.kind.value,
                                  id=str(event.id))
            after = event.id
        if events:
            continue
        if state is None or state.is_final:
            # Without a last word a browser's EventSource reconnects to an ended stream every few seconds,
            # forever. No id: a client that reconnects anyway resumes after the last real event.
            yield ServerSentEvent(data=json.dumps({"state": state.value if state else "deleted"}), event="end")
            return
        await anyio.sleep(poll_s)


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}}, **error_responses(404)})
async def job_events(job_id: JobIdPath, engine: EngineDep, settings: SettingsDep,
                     last_event_id: Annotated[int | None, Query(ge=0, le=MAX_DB_INT)] = None,
                     last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                     ) -> EventSourceResponse:
    state, _ = await anyio.to_thread.run_sync(_poll, engine, job_id, MAX_DB_INT)
    if state is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")  # before the stream starts
    after = last_event_id
    if after is None and last_event_id_header:
        try:
            after = int(last_event_id_header)
            if not 0 <= after <= MAX_DB_INT:
                raise ValueError
        except ValueError:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                [{"loc": ["header", "Last-Event-ID"], "msg": "must be an integer >= 0",
                                  "type": "int_parsing"}]) from None
    return EventSourceResponse(_follow(engine, job_id, after or 0, settings.sse_poll_s), ping=settings.sse_ping_s)
