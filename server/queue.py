"""The queue as workers see it: registration, heartbeats and leases, claims (multi-node gangs included),
reports and finishes, and the reaper that re-queues jobs whose worker went silent. Keyword-only
operations on a session; callers commit."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, update
from sqlalchemy.exc import IntegrityError
from pydantic import ValidationError
from sqlmodel import Session, col, select

from server.errors import Conflict, NotFound, StaleConfig, Superseded
from server.job_events import add_log, emit, emit_state, note, server_log, set_state
from server.models import (
    NODE_LOG_STRIDE,
    ClaimRequest,
    EventKind,
    FailureClass,
    Finish,
    GpuInfo,
    Heartbeat,
    Job,
    JobNode,
    JobState,
    LogLine,
    Metric,
    Report,
    Worker,
    WorkerPublic,
    WorkerRegister,
    cut_log_line,
    utcnow,
)
from server.settings import Settings
from trainer_core import exit_codes
from trainer_core.command import Rendezvous, placeholder_rendezvous, trainer_argv
from trainer_core.config import TrainConfig, format_validation_error, job_config


def stored_config(job: Job) -> TrainConfig:
    """The job's config as the trainer will read it; StaleConfig (409) when today's schema refuses it.
    Always resuming: a job's output dir is its own, so the only checkpoints there are its earlier attempts'
    (or, for a retry, its original's), which resume=False would delete to start over."""
    try:
        return job_config(job.config)
    except ValidationError as e:
        raise StaleConfig(f"job {job.id}'s stored config is no longer valid: {format_validation_error(e)}") from None


def get_job(*, session: Session, job_id: int, for_update: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id)
    if for_update:  # and re-read: a row this session loaded before the lock may have changed since
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    job = session.exec(stmt).first()
    if job is None:
        raise NotFound(f"job {job_id}")
    return job


def log_if_no_worker_fits(session: Session, job: Job, settings: Settings) -> None:
    """A job no online worker could ever take would wait without a word; the first mistake of a curl user
    on a CPU box is to leave `gpus` at its default of 1. Workers may still come: a hint, not a refusal."""
    now = utcnow()
    online = [w for w in session.exec(select(Worker)).all()
              if worker_online(w, settings, now) and w.stopping_since is None]
    fitting = [w for w in online if len(w.gpus) >= job.gpus]
    if len(fitting) >= job.nodes:
        return
    needs = f"{job.gpus} GPU(s)" if job.gpus else "a CPU slot"
    needs += f" on each of {job.nodes} workers" if job.nodes > 1 else ""
    if not online:
        have = "no worker is online"
    else:
        have = f"{len(online)} worker(s) online with at most {max(len(w.gpus) for w in online)} GPU(s)"
    hint = "; a CPU job is submitted with gpus 0" if job.gpus and not any(w.gpus for w in online) and online else ""
    server_log(session, job, f"queued: it needs {needs}, and {have}: it waits for such a worker{hint}")


@dataclass
class Launch:
    """What a claim hands a worker: the job, its GPUs there, and for a node of a multi-node job the
    rendezvous its torchrun joins."""

    job: Job
    gpu_ids: list[int]
    rendezvous: Rendezvous | None = None
    argv: list[str] = field(default_factory=list)   # the command the worker runs (trainer_core.command.trainer_argv)


def _lose_job(session: Session, job: Job, reason: str) -> None:
    """The job's worker is gone: re-queue it (it resumes from its checkpoint) or give up."""
    job.worker_id = None
    job.gpu_ids = None
    job.lease_expires_at = None
    if job.cancel_requested:
        job.failure_class = FailureClass.cancelled
        job.failure_reason = f"{reason} while cancelling"
        set_state(session, job, JobState.cancelled)
    elif job.attempt < job.max_attempts:
        server_log(session, job, f"{reason}; re-queued (attempt {job.attempt + 1} of {job.max_attempts})")
        job.attempt += 1
        set_state(session, job, JobState.queued)
    else:
        job.failure_class = FailureClass.lost
        job.failure_reason = f"{reason}; gave up after {job.attempt} attempts"
        server_log(session, job, job.failure_reason, operator_log=False)   # set_state's line has the reason
        set_state(session, job, JobState.failed)


def _worker_name(session: Session, worker_id: int | None) -> str:
    worker = session.get(Worker, worker_id) if worker_id is not None else None
    return worker.name if worker else "?"


def register_worker(*, session: Session, registration: WorkerRegister) -> Worker:
    """A worker that comes back under the same name is a restart: its old jobs are re-queued at once
    (the new process killed its predecessor's process groups before registering), and its reservations
    for multi-node jobs are dropped."""
    worker = session.exec(select(Worker).where(Worker.name == registration.name)).first()
    now = utcnow()
    if worker is None:
        worker = Worker(name=registration.name)
    else:
        _drop_jobs_of_worker(session, worker, f"worker {worker.name} restarted")
    worker.hostname = registration.hostname
    worker.gpus = [g.model_dump() for g in registration.gpus]
    worker.registered_at = now
    worker.last_heartbeat_at = now
    worker.left_at = None
    worker.stopping_since = None
    worker.instance = registration.instance
    session.add(worker)
    session.flush()
    note(session, f"worker {worker.name} (id {worker.id}, {worker.hostname}) registered with GPUs "
                  f"{[g['index'] for g in worker.gpus] or 'none'}")
    return worker


def leave_worker(*, session: Session, worker: Worker) -> None:
    """A clean stop: the worker is offline now, and anything still leased to it goes back to the queue at
    once (normally nothing: it hands its jobs back before it leaves)."""
    _drop_jobs_of_worker(session, worker, f"worker {worker.name} stopped")
    worker.left_at = utcnow()
    session.add(worker)
    session.flush()
    note(session, f"worker {worker.name} (id {worker.id}) stopped")


def worker_online(worker: Worker, settings: Settings, now: datetime) -> bool:
    return worker.left_at is None and worker.last_heartbeat_at >= now - timedelta(seconds=settings.lease_ttl_s)


def _drop_jobs_of_worker(session: Session, worker: Worker, why: str) -> None:
    """Re-queue the worker's running jobs and release its reservations for multi-node jobs."""
    single = select(Job).where(Job.worker_id == worker.id, Job.state == JobState.running, Job.nodes == 1)
    for job in session.exec(single).all():
        _lose_job(session, job, why)
    for node, job in _lock_nodes_of_worker(session, worker):
        if node.finished:   # its part is done (it left while the other nodes finish): nothing to re-run
            continue
        if job.state == JobState.running:
            _lose_job(session, job, why)
        else:
            _release_reservations(session, job, why)


def get_worker(*, session: Session, worker_id: int, instance: str | None = None) -> Worker:
    """The worker, for a call from its process `instance` (None: unchecked); a process whose name another
    one registered since is Superseded: two processes under one name would both run jobs."""
    worker = session.get(Worker, worker_id)
    if worker is None:
        raise NotFound(f"worker {worker_id}")
    if instance is not None and worker.instance is not None and instance != worker.instance:
        raise Superseded(f"another worker process registered as {worker.name!r} (on {worker.hostname or 'a host'}) "
                         "after this one: each worker needs a name of its own")
    return worker


def list_workers(*, session: Session, settings: Settings) -> list[WorkerPublic]:
    """Every registered worker, with whether it is online and the jobs it runs now."""
    now = utcnow()
    workers = session.exec(select(Worker).order_by(col(Worker.id))).all()
    running = [*session.exec(select(Job.id, Job.worker_id).where(Job.state == JobState.running, Job.nodes == 1)),
               *session.exec(select(JobNode.job_id, JobNode.worker_id).join(Job)
                             .where(Job.state == JobState.running))]
    by_worker: dict[int, list[int]] = {}
    for job_id, worker_id in running:
        by_worker.setdefault(worker_id, []).append(job_id)
    result = []
    for w in workers:
        online = worker_online(w, settings, now)
        # stopping describes a worker still there: one that left or went silent has stopped
        result.append(WorkerPublic(id=w.id, name=w.name, hostname=w.hostname, gpus=[GpuInfo(**g) for g in w.gpus],
                                   registered_at=w.registered_at, last_heartbeat_at=w.last_heartbeat_at,
                                   left_at=w.left_at, online=online, stopping=online and w.stopping_since is not None,
                                   running_job_ids=sorted(by_worker.get(w.id or -1, []))))
    return result


def heartbeat(*, session: Session, worker: Worker, beat: Heartbeat, settings: Settings) -> list[int]:
    """Renews the leases of the jobs the worker still runs (and of its reservations); returns the jobs it
    must stop (cancelled, or no longer its own because a lease ran out)."""
    if worker.left_at is not None:   # the bundled worker registers again on this answer (a 409, as for a lost one)
        raise Conflict(f"worker {worker.name} left (POST .../leave); it registers again to run jobs")
    now = utcnow()
    lease = now + timedelta(seconds=settings.lease_ttl_s)
    worker.last_heartbeat_at = now
    if beat.stopping and worker.stopping_since is None:
        worker.stopping_since = now
    session.add(worker)
    reported = set(beat.running_job_ids)
    held = {job.id: job for job in session.exec(
        select(Job).where(Job.worker_id == worker.id, Job.state == JobState.running, Job.nodes == 1))}
    alive = [job_id for job_id in reported if job_id in held]
    if alive:
        session.exec(update(Job).where(col(Job.id).in_(alive), Job.state == JobState.running,
                                       Job.worker_id == worker.id).values(lease_expires_at=lease))
    for node, job in _lock_nodes_of_worker(session, worker):
        if beat.stopping and not node.launched:  # it will claim nothing more: free what it holds for a gang
            if job.state == JobState.queued:
                _release_reservations(session, job, f"worker {worker.name} is stopping")
            else:
                _lose_job(session, job, f"worker {worker.name} stopped before starting node {node.node}")
            continue
        if job.state == JobState.queued:
            node.lease_expires_at = lease  # a reservation lives as long as its worker
        elif node.launched and job.id in reported:
            node.lease_expires_at = lease
            held[job.id] = job
        else:
            continue
        session.add(node)
        session.flush()
        if job.state == JobState.running:
            _refresh_gang_lease(session, job)
    stop = [job_id for job_id in reported if job_id not in held]
    stop += [job_id for job_id in reported if job_id in held and held[job_id].cancel_requested]
    return sorted(set(stop))


def _lock_nodes_of_worker(session: Session, worker: Worker) -> list[tuple[JobNode, Job]]:
    """The worker's nodes with their jobs, locked jobs first (the reaper's order, so PostgreSQL never sees the
    two wait on each other) and re-read after the lock: a node removed meanwhile is not returned."""
    job_ids = session.exec(select(JobNode.job_id).where(JobNode.worker_id == worker.id)).all()
    if not job_ids:
        return []
    jobs = {job.id: job for job in session.exec(
        select(Job).where(col(Job.id).in_(job_ids)).order_by(col(Job.id)).with_for_update()
        .execution_options(populate_existing=True))}
    nodes = session.exec(select(JobNode).where(JobNode.worker_id == worker.id, col(JobNode.job_id).in_(list(jobs)))
                         .with_for_update().execution_options(populate_existing=True)).all()
    return [(node, jobs[node.job_id]) for node in nodes]


def _refresh_gang_lease(session: Session, job: Job) -> None:
    """A multi-node job's lease is its least recently renewed node's: one silent node loses the gang."""
    earliest = session.exec(select(func.min(JobNode.lease_expires_at))
                            .where(JobNode.job_id == job.id, col(JobNode.finished).is_(False))).one()
    if earliest is not None:
        job.lease_expires_at = earliest
        session.add(job)


def _online_workers(session: Session, worker: Worker, settings: Settings, now: datetime) -> int:
    """Workers that heartbeat within a TTL and have not left, the claiming one included (its claim is proof
    of life). The same rule as `worker_online`, in SQL."""
    since = now - timedelta(seconds=settings.lease_ttl_s)
    others = session.exec(select(func.count()).select_from(Worker).where(
        col(Worker.last_heartbeat_at) >= since, col(Worker.left_at).is_(None), Worker.id != worker.id)).one()
    return others + 1


def claim_job(*, session: Session, worker: Worker, request: ClaimRequest, settings: Settings) -> Launch | None:
    """The worker's next launch with its command (see _next_launch). A job whose stored config today's
    schema refuses fails here, as bad data: no worker could run it, and it must not hold the queue's head."""
    if worker.left_at is not None:   # offline: a job it took would show running on a worker that is not there
        raise Conflict(f"worker {worker.name} left (POST .../leave); it registers again to take jobs")
    launch = _next_launch(session, worker, request, settings)
    if launch is None:
        return None
    job = launch.job
    try:
        launch.argv = trainer_argv(stored_config(job), nproc=job.nproc, rendezvous=launch.rendezvous)
    except StaleConfig as e:
        finish_job(session=session, job_id=job.id, finish=Finish(
            worker_id=worker.id, attempt=job.attempt, exit_code=exit_codes.BAD_INPUT,
            failure_class=FailureClass.data, failure_reason=str(e)))
        return None
    return launch


def _next_launch(session: Session, worker: Worker, request: ClaimRequest, settings: Settings) -> Launch | None:
    """The worker's next launch: a node of a multi-node job whose gang another worker completed, else the
    highest-priority, oldest queued job that fits the worker's free GPUs.

    A multi-node job is claimed node by node: each claim reserves one worker's GPUs for it, and the claim
    that completes the gang starts it. A worker holds one reservation at a time, and a job asking for more
    nodes than there are online workers reserves nothing (it waits; other jobs go on).

    The state change is a conditional UPDATE (`... WHERE state = 'queued'`), so of two workers racing
    for a job only one UPDATE matches a row (and on SQLite the whole transaction holds the write lock).
    """
    if worker.stopping_since is not None:   # a claim sent just before its stop signal: it starts nothing more
        return None
    nodes = _lock_nodes_of_worker(session, worker)  # one indexed query when the worker holds none
    launch = _unanswered_launch(session, worker, request, nodes) or _pending_launch(session, nodes, settings)
    if launch is not None:
        return launch
    now = utcnow()
    reservations = [node for node, job in nodes if job.state == JobState.queued]
    free = sorted(set(request.free_gpu_indices) - {i for node in reservations for i in node.gpu_ids})
    stmt = select(Job).where(Job.state == JobState.queued, Job.gpus <= len(free))
    if request.busy_job_ids:   # two attempts of a job on one machine would write the same output dir at once
        stmt = stmt.where(col(Job.id).not_in(request.busy_job_ids))
    if not request.accept_cpu_jobs or any(not node.gpu_ids for node in reservations):
        stmt = stmt.where(Job.gpus > 0)
    if reservations or request.rdzv_address is None or request.rdzv_port is None:
        stmt = stmt.where(Job.nodes == 1)
    else:
        stmt = stmt.where(Job.nodes <= _online_workers(session, worker, settings, now))
    candidates = session.exec(stmt.order_by(col(Job.priority).desc(), col(Job.id)).limit(20)).all()
    for job in candidates:
        gpu_ids = free[:job.gpus]
        if job.nodes > 1:
            return _reserve_node(session, job, worker, gpu_ids, request, settings, now)
        result = session.exec(
            update(Job).where(Job.id == job.id, Job.state == JobState.queued).values(
                state=JobState.running, worker_id=worker.id, gpu_ids=gpu_ids, started_at=now,
                lease_expires_at=now + timedelta(seconds=settings.lease_ttl_s)))
        if result.rowcount == 1:  # type: ignore[attr-defined]
            session.refresh(job)
            server_log(session, job, f"attempt {job.attempt} started on worker {worker.name}"
                        + (f" GPUs {gpu_ids}" if gpu_ids else " (CPU)"))
            emit_state(session, job)
            return Launch(job, gpu_ids)
    return None


def _reserve_node(session: Session, job: Job, worker: Worker, gpu_ids: list[int], request: ClaimRequest,
                  settings: Settings, now: datetime) -> Launch | None:
    """Reserves the next node of a queued multi-node job; the reservation that completes the gang starts
    the job and returns this worker's launch (None: reserved, waiting for more workers)."""
    assert request.rdzv_address is not None and request.rdzv_port is not None
    job = get_job(session=session, job_id=job.id, for_update=True)  # the reaper may be releasing its gang
    if job.state != JobState.queued:
        return None
    lease = now + timedelta(seconds=settings.lease_ttl_s)
    taken = list(session.exec(select(JobNode).where(JobNode.job_id == job.id).order_by(col(JobNode.node))))
    node = JobNode(job_id=job.id, node=len(taken), worker_id=worker.id, gpu_ids=gpu_ids,
                   address=request.rdzv_address, rdzv_port=request.rdzv_port, reserved_at=now, lease_expires_at=lease)
    try:
        with session.begin_nested():
            session.add(node)
    except IntegrityError:  # another worker took that node at the same moment (SQLite serialises claims anyway)
        return None
    where = f" GPUs {gpu_ids}" if gpu_ids else " (CPU)"
    missing = job.nodes - len(taken) - 1
    if missing == 0 and session.exec(select(func.count()).select_from(JobNode).where(
            JobNode.job_id == job.id, col(JobNode.lease_expires_at) < now)).one():
        # a reserving worker went silent (the reaper frees such gangs each second): a gang started with it
        # would wait for that node, then be lost, costing an attempt
        _release_reservations(session, job, "a reserving worker went silent")
        return None
    if missing > 0:
        server_log(session, job, f"node {node.node} reserved on worker {worker.name}{where}; "
                                  f"waiting for {missing} more worker{'s' if missing > 1 else ''}")
        return None
    nodes = [*taken, node]
    head = nodes[0]
    result = session.exec(update(Job).where(Job.id == job.id, Job.state == JobState.queued).values(
        state=JobState.running, worker_id=head.worker_id, gpu_ids=head.gpu_ids, started_at=now, lease_expires_at=lease))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(job)
    for other in nodes:  # every node must launch within one TTL: the others claim it within a second or two
        other.lease_expires_at = lease
        session.add(other)
    node.launched = True
    placement = ", ".join(f"node {n.node} on {_worker_name(session, n.worker_id)}" for n in nodes)
    server_log(session, job, f"attempt {job.attempt} started on {job.nodes} workers: {placement}")
    emit_state(session, job)
    return Launch(job, node.gpu_ids, _rendezvous(job, node, head))


def _unanswered_launch(session: Session, worker: Worker, request: ClaimRequest,
                       nodes: list[tuple[JobNode, Job]]) -> Launch | None:
    """A launch this worker was given but never heard of: the answer to an earlier claim was lost (a timeout
    while the server committed it). It runs nothing of it (not in its `busy_job_ids`): offered again as it was,
    rather than left to lapse as a lost attempt while a gang's other nodes wait for this one."""
    if request.busy_job_ids is None:   # a worker that does not say what it runs
        return None
    busy = set(request.busy_job_ids)
    for node, job in nodes:
        if node.launched and not node.finished and job.state == JobState.running and job.id not in busy:
            server_log(session, job, f"node {node.node}'s launch offered again to worker {worker.name}, which "
                                     "had not received it")
            return _node_launch(session, job, node)
    held = session.exec(select(Job).where(Job.worker_id == worker.id, Job.state == JobState.running,
                                          Job.nodes == 1).order_by(col(Job.id))).all()
    free = set(request.free_gpu_indices)
    for job in held:
        if job.id not in busy and set(job.gpu_ids or []) <= free and (job.gpus > 0 or request.accept_cpu_jobs):
            server_log(session, job, f"attempt {job.attempt} offered again to worker {worker.name}, which had not "
                                     "received it")
            return Launch(job, list(job.gpu_ids or []))
    return None


def _pending_launch(session: Session, nodes: list[tuple[JobNode, Job]], settings: Settings) -> Launch | None:
    """A node of a running multi-node job that this worker reserved and has not started yet."""
    row = next(((node, job) for node, job in nodes if not node.launched and job.state == JobState.running), None)
    if row is None:
        return None
    node, job = row
    node.launched = True
    node.lease_expires_at = utcnow() + timedelta(seconds=settings.lease_ttl_s)   # a TTL from its launch
    session.add(node)
    session.flush()
    _refresh_gang_lease(session, job)
    return _node_launch(session, job, node)


def _node_launch(session: Session, job: Job, node: JobNode) -> Launch:
    head = session.get(JobNode, (job.id, 0))
    assert head is not None
    return Launch(job, node.gpu_ids, _rendezvous(job, node, head))


def _rendezvous(job: Job, node: JobNode, head: JobNode) -> Rendezvous:
    host = f"[{head.address}]" if ":" in head.address else head.address  # an IPv6 address
    return Rendezvous(nnodes=job.nodes, node=node.node, endpoint=f"{host}:{head.rdzv_port}",
                      run_id=f"paratrain-job{job.id}-attempt{job.attempt}", local_addr=node.address)


def node0_rendezvous(*, session: Session, job: Job) -> Rendezvous | None:
    """Node 0's rendezvous of a running multi-node job; placeholders before the gang is placed."""
    head = session.get(JobNode, (job.id, 0)) if job.state == JobState.running else None
    if head is None:
        return placeholder_rendezvous(job.nodes, run_id=f"paratrain-job{job.id}-attempt{job.attempt}")
    return _rendezvous(job, head, head)


def _release_reservations(session: Session, job: Job, reason: str) -> None:
    session.exec(delete(JobNode).where(JobNode.job_id == job.id))  # type: ignore[arg-type]
    server_log(session, job, f"reservations released ({reason}); the job waits for {job.nodes} workers again")
    emit_state(session, job)


def release_stale_reservations(*, session: Session, now: datetime, settings: Settings) -> list[int]:
    """The reaper's step for gangs still forming: a reservation whose worker went silent, or a gang not
    complete after `gang_wait_s`, gives every reserved GPU back (two half-formed gangs never wait on each
    other forever)."""
    stale_ids = session.exec(select(JobNode.job_id).join(Job).where(Job.state == JobState.queued).where(
        (col(JobNode.lease_expires_at) < now)
        | (col(JobNode.reserved_at) < now - timedelta(seconds=settings.gang_wait_s))).distinct()).all()
    locked = [get_job(session=session, job_id=job_id, for_update=True) for job_id in sorted(stale_ids)]
    stale = [job for job in locked if job.state == JobState.queued]   # PostgreSQL: a gang completed meanwhile
    for job in stale:
        _release_reservations(session, job, f"the gang was not complete after {settings.gang_wait_s:g} s "
                                            "or a reserving worker went silent")
    return [job.id for job in stale if job.id is not None]


def _held_job(session: Session, job_id: int, worker_id: int, attempt: int) -> tuple[Job, JobNode | None]:
    """The running job and, for a multi-node job, the worker's node of it; 409 when it is not the worker's."""
    job = get_job(session=session, job_id=job_id, for_update=True)
    if job.state == JobState.running and job.attempt == attempt:
        if job.nodes == 1 and job.worker_id == worker_id:
            return job, None
        node = session.exec(select(JobNode).where(JobNode.job_id == job_id, JobNode.worker_id == worker_id,
                                                  col(JobNode.launched).is_(True))).first()
        if job.nodes > 1 and node is not None:
            return job, node
    raise Conflict(f"job {job_id} attempt {attempt} is not running on worker {worker_id}")


def record_report(*, session: Session, job_id: int, report: Report, settings: Settings) -> bool:
    """Stores the attempt's metrics and log lines and renews its lease; True when the job was cancelled (the
    worker reports every half second while the job prints: sooner than its next heartbeat)."""
    job, node = _held_job(session, job_id, report.worker_id, report.attempt)
    lease = utcnow() + timedelta(seconds=settings.lease_ttl_s)  # a report is proof of life
    if node is None:
        job.lease_expires_at = lease
    else:
        node.lease_expires_at = lease
        session.add(node)
        session.flush()
        _refresh_gang_lease(session, job)
    for point in report.metrics:
        values = point.model_dump(exclude={"total_steps"})
        row = session.get(Metric, (job_id, point.step))
        stored = None if row is None else row.model_dump(exclude={"job_id"})
        if row is None:
            session.add(Metric(job_id=job_id, **values))
        elif stored == values or (values["eta_s"] is None and {**stored, "eta_s": None} == values):
            continue  # a re-sent point (a worker back-filling from metrics.jsonl, without the old ETA): streamed
        else:  # a resumed attempt re-ran this step: the newer value replaces the old one
            row.sqlmodel_update(values)
        emit(session, job, EventKind.metric, values)
        job.step = point.step
        job.last_loss = point.loss if point.loss is not None else job.last_loss
        job.last_val_loss = point.val_loss if point.val_loss is not None else job.last_val_loss
        job.tokens_per_s = point.tokens_per_s
        job.eta_s = point.eta_s
        if point.total_steps is not None:
            job.total_steps = point.total_steps
        if point.gpu_mem_gb is not None:
            job.peak_mem_gb = max(job.peak_mem_gb or 0.0, point.gpu_mem_gb)
    if report.logs:
        base = node.node * NODE_LOG_STRIDE if node else 0
        prefix = f"[node {node.node}] " if node else ""
        stored = session.exec(select(func.max(LogLine.idx)).where(
            LogLine.job_id == job_id, LogLine.attempt == report.attempt,
            LogLine.idx >= base, LogLine.idx < base + NODE_LOG_STRIDE)).one()
        next_idx = -1 if stored is None else stored - base
        for idx, line in enumerate(report.logs, start=report.log_start):
            if idx > next_idx:
                # the node's prefix on top of the limit: a line its worker cut fits whole, marker included
                add_log(session, job, prefix + cut_log_line(line, settings.max_log_line_chars),
                        attempt=report.attempt, idx=base + idx)
    session.add(job)
    return job.cancel_requested


def finish_job(*, session: Session, job_id: int, finish: Finish) -> Job:
    job, node = _held_job(session, job_id, finish.worker_id, finish.attempt)
    job.exit_code = finish.exit_code
    who = f"node {node.node} (worker {_worker_name(session, node.worker_id)})" if node else ""
    if finish.release and not job.cancel_requested:
        _hand_back(session, job, f"handed back{' by ' + who if who else ''} "
                                 f"({finish.failure_reason or 'its worker is stopping'})")
        return job
    # a hand-back exits 0 too, mid-run (here only when a cancel crossed it, which the branch below honours)
    completed = finish.exit_code == 0 and finish.failure_class is None and not finish.release
    # A cancel that reached a trainer already past its last step does not undo it: the job succeeded.
    if job.cancel_requested and not completed:
        job.failure_class = FailureClass.cancelled
        job.failure_reason = finish.failure_reason or "cancelled"
        set_state(session, job, JobState.cancelled)
    elif finish.failure_class == FailureClass.cancelled:
        # Only a user cancels a job. A run its worker stopped as cancelled while nobody asked was stopped by
        # mistake (a stale stop): it resumes from its checkpoint, up to max_attempts.
        _lose_job(session, job, f"{who + ': ' if who else ''}stopped by its worker, but no cancel was requested")
    elif finish.failure_class == FailureClass.lost:   # stopped from outside: again, up to max_attempts
        stopping = _stopping_peer(session, job, node) if node is not None else None
        if stopping is not None and not job.cancel_requested:
            # A gang stops together: a peer's worker handing its node back stopped this one too. Its release
            # may arrive after this finish; either way the gang is handed back, not lost.
            _hand_back(session, job, f"{who} stopped with its gang (worker {stopping} is stopping)")
        else:
            _lose_job(session, job, f"{who + ': ' if who else ''}{finish.failure_reason or 'lost'}")
    elif completed:
        if node is not None and _finish_node(session, job, node):
            return job
        set_state(session, job, JobState.succeeded)
    elif node is not None and finish.failure_class in (None, FailureClass.crash):
        # When one machine of a gang goes away, the others' torchruns die with it (lost peers, a lost
        # rendezvous store), often before the server notices the missing node. So a node's crash re-queues
        # the gang like a lost lease, up to max_attempts; bad data or OOM would fail again and fail at once.
        first_line = (finish.failure_reason or f"exit code {finish.exit_code}").splitlines()[0][:300]
        _lose_job(session, job, f"{who} crashed ({first_line})")
    else:
        job.failure_class = finish.failure_class or FailureClass.crash
        # a failed job always says why, even when its worker sent no words (an older worker, a bare client)
        reason = finish.failure_reason or f"{job.failure_class.value}, exit code {finish.exit_code}"
        job.failure_reason = f"{who}: {reason}" if who else reason
        set_state(session, job, JobState.failed)
    return job


def _hand_back(session: Session, job: Job, message: str) -> None:
    """Re-queue a job its worker gave back (stopping). Every run is an attempt (its log lines are numbered per
    attempt), but a hand-back is no failure: it must not use up the lost-run budget, so the budget grows with it."""
    job.worker_id = None
    job.gpu_ids = None
    job.lease_expires_at = None
    job.attempt += 1
    job.max_attempts += 1
    server_log(session, job, f"{message}; re-queued as attempt {job.attempt} of {job.max_attempts} "
                             "(a hand-back does not count against max_attempts)")
    set_state(session, job, JobState.queued)


def _stopping_peer(session: Session, job: Job, node: JobNode) -> str | None:
    """The name of a stopping worker running another node of this gang, if any."""
    peer = session.exec(select(Worker).join(JobNode, col(JobNode.worker_id) == col(Worker.id)).where(
        JobNode.job_id == job.id, JobNode.node != node.node, col(Worker.stopping_since).is_not(None))).first()
    return peer.name if peer else None


def _finish_node(session: Session, job: Job, node: JobNode) -> bool:
    """Marks one node of a multi-node job done; True while other nodes still run."""
    node.finished = True
    session.add(node)
    session.flush()
    running = session.exec(select(func.count()).select_from(JobNode).where(
        JobNode.job_id == job.id, col(JobNode.finished).is_(False))).one()
    if running == 0:
        return False
    server_log(session, job, f"node {node.node} finished; waiting for {running} more node{'s' if running > 1 else ''}")
    _refresh_gang_lease(session, job)
    return True


def requeue_expired(*, session: Session, now: datetime) -> list[int]:
    """The reaper's step: running jobs whose lease ran out lose their worker (for a multi-node job, the
    first node that went silent loses the whole gang)."""
    # FOR UPDATE (PostgreSQL; SQLite's write lock covers it): a heartbeat renewing one of these leases right now
    # either commits first, and the row no longer matches, or waits for this re-queue.
    expired = session.exec(select(Job).where(Job.state == JobState.running, col(Job.lease_expires_at) < now)
                           .order_by(col(Job.id)).with_for_update().execution_options(populate_existing=True)).all()
    for job in expired:
        worker_id, where = job.worker_id, ""
        if job.nodes > 1:
            silent = session.exec(select(JobNode).where(JobNode.job_id == job.id, col(JobNode.finished).is_(False))
                                  .order_by(col(JobNode.lease_expires_at))).first()
            if silent is not None:
                worker_id, where = silent.worker_id, f" (node {silent.node})"
        _lose_job(session, job, f"worker {_worker_name(session, worker_id)}{where} stopped heartbeating "
                                "(lease expired)")
    return [job.id for job in expired if job.id is not None]


def extend_all_leases(*, session: Session, settings: Settings) -> None:
    """At server start: the server was down, not the workers; give them one TTL to heartbeat again."""
    lease = utcnow() + timedelta(seconds=settings.lease_ttl_s)
    session.exec(update(Job).where(Job.state == JobState.running).values(lease_expires_at=lease))
    session.exec(update(JobNode).values(lease_expires_at=lease, reserved_at=utcnow()))
