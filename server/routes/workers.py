"""Workers: the user-facing list, and the agent endpoints (worker token) that run the queue."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from server import queue
from server.deps import (JobIdPath, SessionDep, SettingsDep, UserAuth, WorkerAuth, WorkerIdPath, WriteSessionDep,
                         error_responses)
from server.models import (
    Claim,
    ClaimRequest,
    Finish,
    Heartbeat,
    HeartbeatReply,
    Job,
    JobPublic,
    Report,
    ReportReply,
    WorkerLeave,
    WorkerRegister,
    WorkerRegistered,
    WorkersPublic,
)
from trainer_core.config import fields_at_default

router = APIRouter(prefix="/workers", tags=["workers"], dependencies=[UserAuth], responses=error_responses(401))
# an agent call names a worker (404; register does not), may find another process under its name (410), writes
agent_router = APIRouter(tags=["worker agent"], dependencies=[WorkerAuth],
                         responses=error_responses(401, 404, 410, 413, 503))


@router.get("", response_model=WorkersPublic)
def list_workers(session: SessionDep, settings: SettingsDep) -> WorkersPublic:
    return WorkersPublic(data=queue.list_workers(session=session, settings=settings))


@agent_router.post("/workers/register", response_model=WorkerRegistered)
def register_worker(registration: WorkerRegister, session: WriteSessionDep,
                    settings: SettingsDep) -> WorkerRegistered:
    worker = queue.register_worker(session=session, registration=registration)
    session.commit()
    assert worker.id is not None
    return WorkerRegistered(worker_id=worker.id, heartbeat_interval_s=settings.heartbeat_interval_s,
                            lease_ttl_s=settings.lease_ttl_s)


@agent_router.post("/workers/{worker_id}/heartbeat", response_model=HeartbeatReply, responses=error_responses(409))
def heartbeat(worker_id: WorkerIdPath, beat: Heartbeat, session: WriteSessionDep,
              settings: SettingsDep) -> HeartbeatReply:
    worker = queue.get_worker(session=session, worker_id=worker_id, instance=beat.instance)
    stop = queue.heartbeat(session=session, worker=worker, beat=beat, settings=settings)
    session.commit()
    return HeartbeatReply(cancel_job_ids=stop)


@agent_router.post("/workers/{worker_id}/leave", status_code=status.HTTP_204_NO_CONTENT)
def leave(worker_id: WorkerIdPath, body: WorkerLeave, session: WriteSessionDep) -> Response:
    """A clean stop: the worker shows offline at once instead of after a lease TTL without heartbeats."""
    worker = queue.get_worker(session=session, worker_id=worker_id, instance=body.instance)
    queue.leave_worker(session=session, worker=worker)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@agent_router.post("/workers/{worker_id}/claim", response_model=Claim,
                   responses={204: {"description": "Nothing to start now: nothing queued fits the free GPUs, or "
                                                   "they were reserved for a multi-node job still forming."},
                              **error_responses(409)})
def claim(worker_id: WorkerIdPath, request: ClaimRequest, session: WriteSessionDep,
          settings: SettingsDep) -> Claim | Response:
    worker = queue.get_worker(session=session, worker_id=worker_id, instance=request.instance)
    launch = queue.claim_job(session=session, worker=worker, request=request, settings=settings)
    session.commit()  # a reservation is stored even when nothing starts yet
    if launch is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return Claim(job=JobPublic.model_validate(launch.job, from_attributes=True), gpu_ids=launch.gpu_ids,
                 argv=launch.argv, rendezvous=launch.rendezvous, default_fields=fields_at_default(launch.job.config))


@agent_router.post("/jobs/{job_id}/report", response_model=ReportReply, responses=error_responses(409))
def report(job_id: JobIdPath, body: Report, session: WriteSessionDep, settings: SettingsDep) -> ReportReply:
    cancel = queue.record_report(session=session, job_id=job_id, report=body, settings=settings)
    session.commit()
    return ReportReply(cancel_requested=cancel)


@agent_router.post("/jobs/{job_id}/finish", response_model=JobPublic, responses=error_responses(409))
def finish(job_id: JobIdPath, body: Finish, session: WriteSessionDep) -> Job:
    job = queue.finish_job(session=session, job_id=job_id, finish=body)
    session.commit()
    return job
