"""Typed HTTP client for the worker endpoints of the server API (docs/API.md)."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from server.models import (
    Claim,
    ClaimRequest,
    Finish,
    Heartbeat,
    HeartbeatReply,
    Report,
    ReportReply,
    WorkerLeave,
    WorkerRegister,
    WorkerRegistered,
)
from trainer_core.config import format_validation_error

Reply = TypeVar("Reply", bound=BaseModel)

# Transport errors, 5xx and the 4xx not handled below by name mean "the server (or a proxy) cannot take it
# now": the caller keeps its data and retries.
Unreachable = (httpx.TransportError, httpx.HTTPStatusError)


class Refused(Exception):
    """The exchange cannot succeed as it is: the server answered 400, 413 (too large) or 422 (invalid), the
    body broke the API's schema before it was sent, or the reply did not fit it. The same body would be
    refused again, so the caller must not keep it for a retry, or the report queue (and with it the job's
    finish) would wait forever. Other 4xx (a proxy's 408 or 429) are worth retrying, like 5xx."""


class UnreadableClaim(Refused):
    """The server handed this worker a job (it is now leased to it) in a reply this worker cannot read: a
    server of another version. The caller must finish the job with the reason, or it would sit leased until
    its lease ran out, be claimed again and dropped again until its attempts were used up."""

    def __init__(self, message: str, job_id: int, attempt: int) -> None:
        super().__init__(message)
        self.job_id, self.attempt = job_id, attempt


class Unauthorized(Exception):
    """401: the token is not the server's worker token. At registration the worker stops; once registered,
    it keeps its jobs and retries (the server's token may have changed under it: worker/agent.py RETRIED)."""


class Superseded(Exception):
    """410: another worker process registered under this one's name since. Registering again would only
    push that one out in turn: this process must stop."""


class JobGone(Exception):
    """409/404: the server no longer gives this job to this worker (lease lost, re-queued, deleted)."""


class ServerClient:
    """The worker's side of the API: request and reply bodies are the server's own models (server/models.py),
    so the two sides cannot disagree on a field."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0) -> None:
        self.instance = uuid.uuid4().hex   # this process, as the server tells it from others of its name
        self._http = httpx.Client(base_url=base_url.rstrip("/") + "/api", timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body_model: type[BaseModel], **fields: Any) -> httpx.Response:
        try:
            body = body_model(**fields).model_dump_json()
        except ValidationError as e:   # the server would answer 422
            raise Refused(f"{path}: {format_validation_error(e)}") from None
        response = self._http.post(path, content=body, headers={"Content-Type": "application/json"})
        if response.status_code == 401:
            raise Unauthorized("the server refused the worker token (use its <data_dir>/worker_token)")
        if response.status_code == 410:
            raise Superseded(response.json().get("detail", response.text[:200]))
        if response.status_code in (404, 409):
            raise JobGone(f"{path}: {response.status_code} {response.text[:200]}")
        if response.status_code in (400, 413, 422):
            raise Refused(f"{path}: {response.status_code} {response.text[:300]}")
        response.raise_for_status()
        return response

    @staticmethod
    def _reply(response: httpx.Response, reply_model: type[Reply]) -> Reply:
        try:
            return reply_model.model_validate_json(response.content)
        except ValidationError as e:   # a server of another version
            raise Refused(f"{response.url.path}: the server's reply does not fit this worker's schema: "
                          f"{format_validation_error(e)}") from None

    def register(self, *, name: str, hostname: str, gpus: list[dict]) -> WorkerRegistered:
        response = self._post("/workers/register", WorkerRegister, name=name, hostname=hostname, gpus=gpus,
                              instance=self.instance)
        return self._reply(response, WorkerRegistered)

    def heartbeat(self, worker_id: int, running_job_ids: list[int], stopping: bool = False) -> list[int]:
        response = self._post(f"/workers/{worker_id}/heartbeat", Heartbeat, running_job_ids=running_job_ids,
                              stopping=stopping, instance=self.instance)
        return self._reply(response, HeartbeatReply).cancel_job_ids

    def leave(self, worker_id: int) -> None:
        self._post(f"/workers/{worker_id}/leave", WorkerLeave, instance=self.instance)

    def claim(self, worker_id: int, *, free_gpu_indices: list[int], accept_cpu_jobs: bool,
              rdzv_address: str | None = None, rdzv_port: int | None = None,
              busy_job_ids: list[int] | None = None) -> Claim | None:
        """The job the server hands this worker, or None when there is none (204)."""
        response = self._post(f"/workers/{worker_id}/claim", ClaimRequest, free_gpu_indices=free_gpu_indices,
                              accept_cpu_jobs=accept_cpu_jobs, rdzv_address=rdzv_address, rdzv_port=rdzv_port,
                              instance=self.instance, busy_job_ids=busy_job_ids)
        if response.status_code == 204:
            return None
        try:
            return self._reply(response, Claim)
        except Refused as e:
            try:   # the job is leased to us now: its id and attempt are needed to hand it back failed
                job = response.json()["job"]
                job_id, attempt = int(job["id"]), int(job["attempt"])
            except (ValueError, KeyError, TypeError):
                raise e from None
            raise UnreadableClaim(str(e), job_id, attempt) from None

    def report(self, job_id: int, *, worker_id: int, attempt: int, metrics: list[dict], logs: list[str],
               log_start: int) -> bool:
        """Sends the batch; True when the job was cancelled meanwhile (a server before 2026-11-29 answers 204:
        the next heartbeat says it)."""
        response = self._post(f"/jobs/{job_id}/report", Report, worker_id=worker_id, attempt=attempt,
                              metrics=metrics, logs=logs, log_start=log_start)
        return response.status_code != 204 and self._reply(response, ReportReply).cancel_requested

    def finish(self, job_id: int, *, worker_id: int, attempt: int, exit_code: int, failure_class: str | None,
               failure_reason: str | None, release: bool) -> None:
        self._post(f"/jobs/{job_id}/finish", Finish, worker_id=worker_id, attempt=attempt, exit_code=exit_code,
                   failure_class=failure_class, failure_reason=failure_reason, release=release)
