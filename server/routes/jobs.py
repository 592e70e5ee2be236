"""Jobs: create, list, get, cancel, retry, delete, metrics, logs, artifacts, command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.responses import FileResponse
from sqlmodel import Session

from server import crud, queue
from server.deps import MAX_DB_INT, JobIdPath, SessionDep, SettingsDep, UserAuth, WriteSessionDep, error_responses
from server.errors import FieldError
from server.models import (
    Artifact,
    ArtifactsPublic,
    CommandPublic,
    Job,
    JobCreate,
    JobPublic,
    JobsPublic,
    JobState,
    LogLinePublic,
    LogsPublic,
    MetricBase,
    MetricsPublic,
)
from server.paths import is_dir, safe_child
from trainer_core.command import trainer_argv

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[UserAuth], responses=error_responses(401, 503))


def _command(job: Job, session: Session) -> CommandPublic:
    """Node 0's command for a multi-node job (the real rendezvous once the gang is placed)."""
    rendezvous = queue.node0_rendezvous(session=session, job=job)
    return CommandPublic(argv=trainer_argv(crud.stored_config(job), nproc=job.nproc, rendezvous=rendezvous))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic, responses=error_responses(413))
def create_job(job_in: JobCreate, session: WriteSessionDep, settings: SettingsDep) -> Job:
    job = crud.create_job(session=session, job_create=job_in, settings=settings)
    session.commit()
    return job


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, state: JobState | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50,
              offset: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0) -> JobsPublic:
    jobs, count = crud.list_jobs(session=session, state=state, limit=limit, offset=offset)
    return JobsPublic(data=crud.public_jobs(session=session, jobs=jobs), count=count)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(404))
def get_job(job_id: JobIdPath, session: SessionDep) -> JobPublic:
    return crud.public_jobs(session=session, jobs=[crud.get_job(session=session, job_id=job_id)])[0]


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=error_responses(404, 409))
def cancel_job(job_id: JobIdPath, session: WriteSessionDep) -> Job:
    job = crud.cancel_job(session=session, job_id=job_id)
    session.commit()
    return job


@router.post("/{job_id}/retry", status_code=status.HTTP_201_CREATED, response_model=JobPublic,
             responses=error_responses(404, 409))
def retry_job(job_id: JobIdPath, session: WriteSessionDep, settings: SettingsDep) -> Job:
    job = crud.retry_job(session=session, job_id=job_id, settings=settings)
    session.commit()
    return job


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 409))
def delete_job(job_id: JobIdPath, session: WriteSessionDep, settings: SettingsDep) -> Response:
    crud.delete_job(session=session, job_id=job_id, settings=settings)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{job_id}/metrics", response_model=MetricsPublic, responses=error_responses(404))
def list_metrics(job_id: JobIdPath, session: SessionDep,
                 since_step: Annotated[int, Query(ge=-1, le=MAX_DB_INT)] = -1) -> MetricsPublic:
    """The points after `since_step`; by default all of them (step 0: the validation loss before training)."""
    rows = crud.list_metrics(session=session, job_id=job_id, since_step=since_step)
    return MetricsPublic(data=[MetricBase.model_validate(r, from_attributes=True) for r in rows])


@router.get("/{job_id}/logs", response_model=LogsPublic, responses=error_responses(404))
def list_logs(job_id: JobIdPath, session: SessionDep, offset: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0,
              limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> LogsPublic:
    rows = crud.list_logs(session=session, job_id=job_id, offset=offset, limit=limit)
    next_offset = rows[-1].seq + 1 if rows else offset
    return LogsPublic(data=[LogLinePublic(seq=r.seq, line=r.line) for r in rows], next_offset=next_offset)


def _output_dir(job: Job) -> Path:
    return Path(job.config["output_dir"])


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic, responses=error_responses(404))
def list_artifacts(job_id: JobIdPath, session: SessionDep) -> ArtifactsPublic:
    root = _output_dir(crud.get_job(session=session, job_id=job_id))
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()) if root.is_dir() else []
    # dot names are the trainer's own (its claim on the directory, a checkpoint being written); a name that is
    # not UTF-8 (its bytes are surrogates here) cannot go into JSON or a URL, and no trainer writes one
    shown = [p for p in files if all(not part.startswith(".") and part.isprintable()
                                     for part in p.relative_to(root).parts)]
    return ArtifactsPublic(data=[Artifact(path=p.relative_to(root).as_posix(), size=p.stat().st_size)
                                 for p in shown])


@router.get("/{job_id}/artifacts/{path:path}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(404)})
def download_artifact(job_id: JobIdPath, path: str, session: SessionDep) -> FileResponse:
    root = _output_dir(crud.get_job(session=session, job_id=job_id))
    target = None
    try:
        target = safe_child(root, path)
        found = target.is_file()
    except ValueError as e:
        raise FieldError(("path", "path"), str(e)) from None   # 422 naming the field, as paths elsewhere
    except OSError:  # e.g. a name too long for the file system
        found = False
    if not found:
        if target is not None and is_dir(target):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"{path!r} is a directory: GET /api/jobs/{job_id}/artifacts "
                                                           "lists its files, each downloadable")
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {path!r}")
    assert target is not None
    return FileResponse(target, filename=target.name)


@router.get("/{job_id}/command", response_model=CommandPublic, responses=error_responses(404, 409))
def get_command(job_id: JobIdPath, session: SessionDep) -> CommandPublic:
    return _command(crud.get_job(session=session, job_id=job_id), session)
