"""Tables and API models. The job's training parameters are `trainer_core.config.TrainConfig`; nothing
here lists them."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, field_validator
from sqlalchemy import JSON, BigInteger, Column, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from trainer_core.command import Rendezvous
from trainer_core.config import JobResources, TrainConfig


MAX_DB_INT = 2**63 - 1  # 64-bit integer columns
HostAddress = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._:%-]+$")]
DbInt = Annotated[int, Field(ge=0, le=MAX_DB_INT)]
# Text from clients. PostgreSQL text cannot hold NUL, and no database a lone UTF-16 surrogate (JSON's "\udcff",
# which is not UTF-8): names with either, or with a control character (a newline would forge a line of the
# server's log), are refused (422); what a process printed keeps its line, with U+FFFD in place of each.
Label = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]*$")]


def printable(text: str) -> str:
    """`text` with U+FFFD in place of each NUL and each lone surrogate."""
    return text.replace("\x00", "\ufffd").encode("utf-16", "surrogatepass").decode("utf-16", "replace")


Printed = Annotated[str, AfterValidator(printable)]
# The column type of every integer a client can name or make grow (ids, steps, event ids, log offsets,
# exit codes): BIGINT, so PostgreSQL compares and stores the whole 64-bit range the API accepts; INTEGER on
# SQLite, which is 64-bit already and keeps `INTEGER PRIMARY KEY` a rowid (autoincrement).
BigInt = BigInteger().with_variant(Integer(), "sqlite")
# A multi-node job's log lines are numbered node * NODE_LOG_STRIDE + (index on that node), so the lines of
# all nodes share one (job, attempt, idx) key space; a worker's own indices stay below MAX_LOG_START.
NODE_LOG_STRIDE = 2**40
MAX_LOG_START = 2**39


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

# The only state changes job_events.set_state makes. running -> queued is a lost lease or a worker handing a job back.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled}),
    JobState.running: frozenset({JobState.queued, JobState.succeeded, JobState.failed, JobState.cancelled}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class FailureClass(str, Enum):
    oom = "oom"
    data = "data"
    crash = "crash"
    cancelled = "cancelled"
    lost = "lost"


class EventKind(str, Enum):
    state = "state"
    metric = "metric"
    log = "log"


# --- jobs ------------------------------------------------------------------------------------------

class RequestBody(BaseModel):
    """A body a user writes: a misspelled key is an error rather than a silently dropped option (as in
    TrainConfig), NaN/Infinity are refused, and its own numbers are numbers (`"gpus": true` or `"2"` is a
    mistake, not 1 or 2). The nested TrainConfig keeps its own rules: YAML files give it `1e-4` as text."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class JobCreate(RequestBody, JobResources):
    """What a client submits: the TrainConfig (unknown keys are errors) and the JobResources fields."""

    config: TrainConfig


class JobBase(SQLModel):
    """A job as clients see it (JobPublic); the table adds the queue's own bookkeeping."""

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    name: str
    state: JobState = Field(default=JobState.queued, index=True)
    priority: int = 0
    gpus: int = 1
    nproc: int = 1
    nodes: int = 1
    config: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker_id: int | None = Field(default=None, foreign_key="worker.id", index=True, sa_type=BigInt)
    gpu_ids: list[int] | None = Field(default=None, sa_column=Column(JSON))
    attempt: int = Field(1, sa_type=BigInt)
    max_attempts: int = 3
    retry_of: int | None = Field(None, sa_type=BigInt)
    failure_class: FailureClass | None = None
    failure_reason: str | None = Field(default=None, sa_column=Column(Text))
    exit_code: int | None = Field(None, sa_type=BigInt)
    step: int = Field(0, sa_type=BigInt)
    total_steps: int | None = Field(None, sa_type=BigInt)
    last_loss: float | None = None
    last_val_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    peak_mem_gb: float | None = None
    cancel_requested: bool = False


class Job(JobBase, table=True):
    __table_args__ = (
        Index("ix_job_claim", "state", "priority", "id"),
        {"sqlite_autoincrement": True},  # ids are never reused: a job's output dir is named after its id
    )

    lease_expires_at: datetime | None = None
    last_event_id: int = Field(0, sa_type=BigInt)  # per-job SSE event counter
    log_count: int = Field(0, sa_type=BigInt)  # per-job log line counter (next seq)


class JobPublic(JobBase):
    # every field is in every answer: the response schema says so (clients generated from it need not guess)
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    id: int
    retried_as: int | None = Field(None, description="The job that retries this one (a job is retried once).")


class JobNode(SQLModel, table=True):
    """One worker's share of a multi-node job (nodes > 1); single-node jobs have none.

    While the job is queued its rows are reservations: workers holding GPUs for it until the gang is
    complete. The claim that completes the gang starts the job; the other nodes get their launch with their
    next claim. Rows exist only while the job is queued or running (`job_events.set_state` removes them).
    """
    __table_args__ = (UniqueConstraint("job_id", "worker_id"),)

    job_id: int = Field(foreign_key="job.id", primary_key=True, sa_type=BigInt)
    node: int = Field(primary_key=True)
    worker_id: int = Field(foreign_key="worker.id", index=True, sa_type=BigInt)
    gpu_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    address: str  # where the other nodes reach this worker's machine
    rdzv_port: int  # a port the worker found free when it reserved; node 0's hosts the rendezvous
    reserved_at: datetime = Field(default_factory=utcnow)
    lease_expires_at: datetime
    launched: bool = False  # the worker has been handed its launch
    finished: bool = False  # its trainer exited 0; the job succeeds when every node has


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


# --- metrics, logs, events ----------------------------------------------------------------------------

class MetricBase(SQLModel):
    step: int = Field(ge=0, le=MAX_DB_INT)
    epoch: float | None = None
    loss: float | None = None
    val_loss: float | None = None   # at the steps the validation set was evaluated (step 0: before training)
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    gpu_mem_gb: float | None = None
    eta_s: float | None = None
    # to plot against tokens or time (runs with other batch sizes or speeds): the run's totals at this step,
    # over all its attempts (None: a trainer, or a checkpoint, from before they were counted)
    tokens_seen: int | None = Field(default=None, ge=0, le=MAX_DB_INT, sa_type=BigInt)
    train_s: float | None = None


class MetricIn(MetricBase):
    total_steps: int | None = Field(default=None, ge=0, le=MAX_DB_INT)

    @field_validator("epoch", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "gpu_mem_gb", "eta_s", "train_s",
                     mode="after")
    @classmethod
    def _finite_or_none(cls, value: float | None) -> float | None:
        # NaN/inf are not JSON; a diverged loss shows up in the log lines instead.
        return value if value is None or math.isfinite(value) else None


class Metric(MetricBase, table=True):
    job_id: int = Field(foreign_key="job.id", primary_key=True, sa_type=BigInt)
    step: int = Field(primary_key=True, sa_type=BigInt)


class MetricsPublic(BaseModel):
    data: list[MetricBase]


class LogLine(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("job_id", "seq"),
        UniqueConstraint("job_id", "attempt", "idx"),  # a re-sent report batch is stored once
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    job_id: int = Field(foreign_key="job.id", index=True, sa_type=BigInt)
    seq: int = Field(sa_type=BigInt)
    attempt: int = Field(sa_type=BigInt)
    idx: int = Field(sa_type=BigInt)
    line: str = Field(sa_column=Column(Text, nullable=False))


class LogLinePublic(BaseModel):
    seq: int
    line: str


class LogsPublic(BaseModel):
    data: list[LogLinePublic]
    next_offset: int


class JobEvent(SQLModel, table=True):
    job_id: int = Field(foreign_key="job.id", primary_key=True, sa_type=BigInt)
    id: int = Field(primary_key=True, sa_type=BigInt)
    kind: EventKind
    data: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))


class Artifact(BaseModel):
    path: str
    size: int


class ArtifactsPublic(BaseModel):
    data: list[Artifact]


class CommandPublic(BaseModel):
    argv: list[str]


# --- workers -------------------------------------------------------------------------------------------

class GpuInfo(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)   # an infinite GPU was stored as null, against the schema
    index: int = Field(ge=0, le=1_000_000)
    name: Label = ""
    memory_gb: float = Field(0.0, ge=0)


class Worker(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True, sa_type=BigInt)
    name: str = Field(unique=True, index=True)
    hostname: str = ""
    gpus: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    registered_at: datetime = Field(default_factory=utcnow)
    last_heartbeat_at: datetime = Field(default_factory=utcnow)
    # set when the worker said goodbye on a clean stop (offline at once, not after a lease TTL of silence);
    # cleared when it registers again
    left_at: datetime | None = None
    # the worker process that registered last under this name: an older one still running is told to stop
    instance: str | None = None
    # since when it takes no new jobs (a warm stop: its running jobs finish first); cleared on registering
    stopping_since: datetime | None = None


WorkerInstance = Annotated[str | None, Field(None, max_length=64, description=(
    "A random id of the worker process (from its registration on): when another process registers under the "
    "same name, this one's heartbeats and claims get 410 and it stops."))]


class WorkerRegister(BaseModel):
    name: Label = Field(min_length=1, max_length=200)
    hostname: Label = Field("", max_length=255)
    gpus: list[GpuInfo] = Field(default_factory=list)
    instance: WorkerInstance = None


class WorkerLeave(BaseModel):
    instance: WorkerInstance = None


class WorkerRegistered(BaseModel):
    worker_id: int
    heartbeat_interval_s: float
    lease_ttl_s: float


class WorkerPublic(BaseModel):
    id: int
    name: str
    hostname: str
    gpus: list[GpuInfo]
    registered_at: datetime
    last_heartbeat_at: datetime
    left_at: datetime | None
    online: bool
    stopping: bool = Field(description="Online but taking no new jobs: it stops once its running jobs end.")
    running_job_ids: list[int]


class WorkersPublic(BaseModel):
    data: list[WorkerPublic]


class Heartbeat(BaseModel):
    running_job_ids: list[DbInt] = Field(default_factory=list, max_length=10_000)
    stopping: bool = Field(False, description="The worker takes no new work: its reservations for multi-node "
                                              "jobs are given back.")
    instance: WorkerInstance = None


class HeartbeatReply(BaseModel):
    cancel_job_ids: list[int]


class ReportReply(BaseModel):
    cancel_requested: bool = Field(description="The job was cancelled: stop it now, not at the next heartbeat.")


class ClaimRequest(BaseModel):
    free_gpu_indices: list[Annotated[int, Field(ge=0, le=1_000_000)]] = Field(default_factory=list, max_length=4096)
    accept_cpu_jobs: bool = Field(True, description="False when the worker's CPU job slots are full.")
    rdzv_address: HostAddress | None = Field(None, description="How other workers reach this machine, for "
                                     "multi-node jobs; none: the worker takes no multi-node jobs.")
    rdzv_port: int | None = Field(None, ge=1, le=65535, description="A port free on this machine now; used when "
                                  "this worker becomes node 0 of a multi-node job.")
    instance: WorkerInstance = None
    busy_job_ids: list[DbInt] | None = Field(None, max_length=4096, description="Every job this worker runs or has "
                                           "not reported the end of: none of them is offered to it again, and a job "
                                           "leased to it but not among them (a lost claim answer) is offered again. "
                                           "Null: the worker does not say.")


class Claim(BaseModel):
    job: JobPublic
    gpu_ids: list[int]
    argv: list[str]
    rendezvous: Rendezvous | None = Field(None, description="Set for a node of a multi-node job.")
    default_fields: list[str] = Field(default_factory=list, description="The fields of job.config at the "
                                      "server's defaults: a worker of an older version drops those it does not "
                                      "know (the job does not use that feature) instead of refusing the job.")


class Report(BaseModel):
    worker_id: DbInt
    attempt: int = Field(ge=1, le=MAX_DB_INT,
                         description="The attempt the worker is running; reports of older ones are refused.")
    log_start: int = Field(0, ge=0, le=MAX_LOG_START, description="Index of logs[0] among this attempt's lines (re-sends are "
                           "recognised by it).")
    metrics: list[MetricIn] = Field(default_factory=list)
    logs: list[Printed] = Field(default_factory=list)


def cut_log_line(line: str, limit: int) -> str:
    """At most `limit` characters of a log line, saying how many were cut (a printed tensor can be megabytes).
    The worker cuts at its cap and the server at PARATRAIN_MAX_LOG_LINE_CHARS: a line the worker cut fits the
    server's default whole, marker included."""
    if len(line) <= limit:
        return line
    kept = max(0, limit - 40)   # room for the marker, up to " [... 1,000,000,000 characters cut]"
    return line[:kept] + f" [... {len(line) - kept:,} characters cut]"


def reason_in_one_line(reason: str | None, limit: int | None = None) -> str:
    """A failure reason for one log line: its first non-empty line (the headline) and, when there are more,
    " ... " and its last (a traceback's cause); each cut to `limit` characters."""
    lines = [ln for ln in (reason or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    first, last = lines[0][:limit], lines[-1].strip()[:limit]
    return first if len(lines) == 1 else f"{first} ... {last}"


class Finish(BaseModel):
    worker_id: DbInt
    attempt: int = Field(ge=1, le=MAX_DB_INT)
    exit_code: int | None = Field(None, ge=-(2**31), le=2**31)
    failure_class: FailureClass | None = None
    failure_reason: Printed | None = Field(None, max_length=20_000)
    release: bool = Field(False, description="Hand the job back to the queue (the worker is stopping).")
