"""Jobs as users handle them: submit (paths checked and resolved), list, cancel, retry (resuming from the
original's checkpoints), delete; their metrics and logs. Keyword-only operations on a session; callers
commit. What workers do to jobs is in server/queue.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from server.errors import Conflict, FieldError
from server.job_events import emit_state, job_label, note, server_log, set_state
from server.models import (
    FINAL_STATES,
    FailureClass,
    Job,
    JobCreate,
    JobEvent,
    JobNode,
    JobPublic,
    JobState,
    LogLine,
    Metric,
)
from server.paths import confine, confine_data_file, confine_field, is_dir, is_file
from server.queue import get_job, log_if_no_worker_fits, stored_config
from server.settings import Settings
from trainer_core.config import BEST_ADAPTER_DIR, JobResources, TrainConfig, job_config
from trainer_core.data import DataError, validate_file
from trainer_core.model import check_init_adapter


SUBMIT_CHECK_LINES = 1000   # milliseconds to read; the trainer checks every line before it loads a model


def check_first_lines(data_path: Path, as_given: str, field: str) -> None:
    """A file in the wrong format (another JSONL schema, not JSON at all) is refused when the job is submitted,
    not when a worker reaches it: a 422 naming the first bad lines. A bad line further on fails the job
    when its trainer starts (failure_class data), as before."""
    try:
        validate_file(data_path, max_errors=3, max_lines=SUBMIT_CHECK_LINES)
    except DataError as e:
        lines = [line.replace(str(data_path), as_given, 1) for line in e.lines]
        raise FieldError(("body", "config", field), "; ".join(lines)) from None
    except OSError as e:
        raise FieldError(("body", "config", field), f"{as_given!r}: cannot be read ({e.strerror or e})") from None


def resolve_data_file(config: TrainConfig, field: str, settings: Settings) -> Path:
    """The dataset file of `field` (data_path, val_data_path), confined to the data root and its first lines
    checked."""
    path = confine_data_file(getattr(config, field), ("body", "config", field), settings)
    check_first_lines(path, getattr(config, field), field)
    return path


def resolve_init_adapter(config: TrainConfig, settings: Settings, *, check: bool = True) -> Path:
    """The adapter a job starts from, confined to the read roots or to the jobs' outputs (where an earlier job
    wrote it), and checked against the job's settings now rather than when a worker starts it (`check`: not for
    a retry that resumes a checkpoint, which does not read it; its job may have been deleted since)."""
    loc = ("body", "config", "init_adapter")
    try:
        path = confine(config.init_adapter, roots=[*settings.read_roots, settings.jobs_dir], base=settings.data_root)
    except ValueError as e:
        raise FieldError(loc, str(e)) from None
    if not check:
        return path
    try:
        check_init_adapter(config.model_copy(update={"init_adapter": str(path)}))
    except DataError as e:
        raise FieldError(loc, "; ".join(e.lines).replace(str(path), config.init_adapter)) from None
    return path


def resolve_config(config: TrainConfig, *, settings: Settings, job_id: int | str,
                   resumes: bool = False) -> TrainConfig:
    """Paths made absolute and confined to the roots; output_dir is the server's choice (jobs/ID/out).
    `resumes`: a retry that has a checkpoint to resume."""
    data_path = resolve_data_file(config, "data_path", settings)
    val_data_path = resolve_data_file(config, "val_data_path", settings) if config.val_data_path else None
    init_adapter = resolve_init_adapter(config, settings, check=not resumes) if config.init_adapter else None
    base_model = confine_field(config.base_model, ("body", "config", "base_model"), settings)
    if not is_dir(base_model):
        raise FieldError(("body", "config", "base_model"),
                         f"{config.base_model!r}: no such model directory under the data root ({settings.data_root}); "
                         "a job reads a model directory (a hub id works only from the command line, from its cache)")
    if not is_file(base_model / "config.json"):
        raise FieldError(("body", "config", "base_model"),
                         f"{config.base_model!r}: not a HuggingFace model directory (it has no config.json)")
    output_dir = settings.jobs_dir / str(job_id) / "out"
    return job_config({**config.model_dump(), "data_path": str(data_path), "base_model": str(base_model),
                       "val_data_path": str(val_data_path) if val_data_path else None,
                       "init_adapter": str(init_adapter) if init_adapter else None,
                       "output_dir": str(output_dir)})   # stored as it runs: resuming (see stored_config)


def create_job(*, session: Session, job_create: JobCreate, settings: Settings, retry_of: int | None = None,
               resumes: bool = False) -> Job:
    if job_create.gpus > 0 and job_create.nproc not in (None, job_create.gpus):
        raise FieldError(("body", "nproc"), "a GPU job runs one process per GPU; set nproc only when gpus is 0")
    job = Job(
        name=job_create.config.name,
        priority=job_create.priority,
        gpus=job_create.gpus,
        nproc=job_create.procs_per_node,
        nodes=job_create.nodes,
        config={},
        max_attempts=job_create.max_attempts or settings.max_attempts,
        retry_of=retry_of,
    )
    session.add(job)
    session.flush()  # the id names the output dir
    assert job.id is not None
    job.config = resolve_config(job_create.config, settings=settings, job_id=job.id, resumes=resumes).model_dump()
    emit_state(session, job)
    note(session, f"{job_label(job)}: queued" + (f" (a retry of job {retry_of})" if retry_of else "")
         + f", {job.gpus} GPU(s) x {job.nodes} node(s), {job.config['base_model']} on {job.config['data_path']}")
    log_if_no_worker_fits(session, job, settings)
    return job


def list_jobs(*, session: Session, state: JobState | None, limit: int, offset: int) -> tuple[list[Job], int]:
    stmt = select(Job)
    count_stmt = select(func.count()).select_from(Job)
    if state is not None:
        stmt = stmt.where(Job.state == state)
        count_stmt = count_stmt.where(Job.state == state)
    jobs = session.exec(stmt.order_by(col(Job.id).desc()).offset(offset).limit(limit)).all()
    return list(jobs), session.exec(count_stmt).one()


def public_jobs(*, session: Session, jobs: list[Job]) -> list[JobPublic]:
    """The jobs as clients see them, with the job that retries each (one query for them all)."""
    ids = [job.id for job in jobs]
    retried_as = dict(session.exec(select(Job.retry_of, Job.id).where(col(Job.retry_of).in_(ids))).all()) if ids else {}
    public = [JobPublic.model_validate(job, from_attributes=True) for job in jobs]
    return [job.model_copy(update={"retried_as": retried_as.get(job.id)}) for job in public]


def cancel_job(*, session: Session, job_id: int) -> Job:
    job = get_job(session=session, job_id=job_id, for_update=True)
    if job.state == JobState.queued:
        job.failure_class = FailureClass.cancelled
        job.failure_reason = "cancelled before it started"
        set_state(session, job, JobState.cancelled)
    elif job.state == JobState.running:
        if not job.cancel_requested:
            job.cancel_requested = True
            server_log(session, job, "cancel requested; the worker stops the process group")
            emit_state(session, job)
    else:
        raise Conflict(f"job {job_id} has already ended ({job.state.value}): there is nothing to cancel")
    return job


def retry_job(*, session: Session, job_id: int, settings: Settings) -> Job:
    old = get_job(session=session, job_id=job_id)
    if old.state not in FINAL_STATES:
        raise Conflict(f"job {job_id} is {old.state.value}; only a finished job can be retried")
    if old.state == JobState.succeeded:  # a retry resumes from the last checkpoint: here the end of training
        raise Conflict(f"job {job_id} succeeded: there is nothing to resume; submit its config as a new job "
                       "to train again")
    # two retries of one job would both resume from its checkpoint and train the same steps twice
    earlier = session.exec(select(Job.id).where(Job.retry_of == old.id)).first()
    if earlier is not None:
        raise Conflict(f"job {job_id} was already retried as job {earlier}; retry that one if it failed")
    job_create = JobCreate(config=stored_config(old), **JobResources.of_stored_job(old).model_dump())
    old_out = Path(old.config["output_dir"])
    resumes = is_dir(old_out / "checkpoints") and any((old_out / "checkpoints").glob("step_*"))
    job = create_job(session=session, job_create=job_create, settings=settings, retry_of=old.id, resumes=resumes)
    _carry_progress(old_out, Path(job.config["output_dir"]))
    return job


def _carry_progress(old_out: Path, new_out: Path) -> None:
    """A retry resumes where its original stopped: the original's checkpoints and its adapter of the lowest
    validation loss (the retry compares its own with that one) are linked (or copied) into the new job's
    output dir (the trainer never changes their files in place, so sharing their inodes is safe), and its
    metrics.jsonl is copied (the trainer rewrites that one), so the retry's worker reports the loss curve
    from step 1, not from the checkpoint on."""
    source = old_out / "checkpoints"
    if not is_dir(source):
        return
    new_out.mkdir(parents=True, exist_ok=True)
    if is_file(old_out / "metrics.jsonl"):
        shutil.copy2(old_out / "metrics.jsonl", new_out / "metrics.jsonl")

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    # a checkpoint pruned meanwhile by a node of the original still saving as it exits is not one to resume
    # from, nor is an adapter_best/ replaced meanwhile one to keep (the retry measures its own)
    best = old_out / BEST_ADAPTER_DIR
    for src in [*sorted(source.glob("step_*")), *([best] if is_dir(best) else [])]:
        target = new_out / src.relative_to(old_out)
        try:
            shutil.copytree(src, target, copy_function=link_or_copy, dirs_exist_ok=True)
        except (OSError, shutil.Error):
            shutil.rmtree(target, ignore_errors=True)


def delete_job(*, session: Session, job_id: int, settings: Settings) -> None:
    job = get_job(session=session, job_id=job_id, for_update=True)
    if job.state not in FINAL_STATES:
        raise Conflict(f"job {job_id} is {job.state.value}; cancel it first")
    outputs = settings.jobs_dir / str(job_id)
    unfinished = session.exec(select(Job).where(col(Job.state).not_in(FINAL_STATES))).all()
    starting_here = [other for other in unfinished if (other.config or {}).get("init_adapter")
                     and outputs in Path(other.config["init_adapter"]).parents]
    if starting_here:   # a queued job would fail for want of it (a running one may start again, without a checkpoint)
        named = ", ".join(f"job {other.id} ({other.state.value})" for other in starting_here)
        raise Conflict(f"{named} starts from job {job_id}'s adapter (init_adapter): delete job {job_id} once "
                       f"{'they have' if len(starting_here) > 1 else 'it has'} ended, or cancel "
                       f"{'them' if len(starting_here) > 1 else 'it'} first")
    for table in (Metric, LogLine, JobEvent, JobNode):
        session.exec(delete(table).where(table.job_id == job_id))  # type: ignore[attr-defined]
    session.delete(job)
    shutil.rmtree(settings.jobs_dir / str(job_id), ignore_errors=True)


def list_metrics(*, session: Session, job_id: int, since_step: int) -> list[Metric]:
    get_job(session=session, job_id=job_id)
    stmt = select(Metric).where(Metric.job_id == job_id, Metric.step > since_step).order_by(col(Metric.step))
    return list(session.exec(stmt))


def list_logs(*, session: Session, job_id: int, offset: int, limit: int) -> list[LogLine]:
    get_job(session=session, job_id=job_id)
    stmt = (select(LogLine).where(LogLine.job_id == job_id, LogLine.seq >= offset)
            .order_by(col(LogLine.seq)).limit(limit))
    return list(session.exec(stmt))
