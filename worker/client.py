"""Typed HTTP client for the worker endpoints of the server API (docs/API.md)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

# Transport errors, 5xx and the 4xx not handled below by name mean "the server (or a proxy) cannot take it
# now": the caller keeps its data and retries.
Unreachable = (httpx.TransportError, httpx.HTTPStatusError)


class Refused(Exception):
    """400, 413 (too large) or 422 (invalid): the server will refuse the same body again, so the caller must
    not keep it for a retry, or the report queue (and with it the job's finish) would wait forever. Other
    4xx (a proxy's 408 or 429) are worth retrying, like 5xx."""


class Unauthorized(Exception):
    """401: the token is not the server's worker token. Retrying will not help."""


class Superseded(Exception):
    """410: another worker process registered under this one's name since. Registering again would only
    push that one out in turn: this process must stop."""


class JobGone(Exception):
    """409/404: the server no longer gives this job to this worker (lease lost, re-queued, deleted)."""


class ServerClient:
    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0) -> None:
        self.instance = uuid.uuid4().hex   # this process, as the server tells it from others of its name
        self._http = httpx.Client(base_url=base_url.rstrip("/") + "/api", timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        response = self._http.post(path, json=body)
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

    def register(self, *, name: str, hostname: str, gpus: list[dict]) -> dict[str, Any]:
        return self._post("/workers/register", {"name": name, "hostname": hostname, "gpus": gpus,
                                                "instance": self.instance}).json()

    def heartbeat(self, worker_id: int, running_job_ids: list[int], stopping: bool = False) -> list[int]:
        reply = self._post(f"/workers/{worker_id}/heartbeat",
                           {"running_job_ids": running_job_ids, "stopping": stopping,
                            "instance": self.instance}).json()
        return list(reply["cancel_job_ids"])

    def leave(self, worker_id: int) -> None:
        self._post(f"/workers/{worker_id}/leave", {"instance": self.instance})

    def claim(self, worker_id: int, *, free_gpu_indices: list[int], accept_cpu_jobs: bool,
              rdzv_address: str | None = None, rdzv_port: int | None = None) -> dict[str, Any] | None:
        response = self._post(f"/workers/{worker_id}/claim", {
            "free_gpu_indices": free_gpu_indices, "accept_cpu_jobs": accept_cpu_jobs,
            "rdzv_address": rdzv_address, "rdzv_port": rdzv_port, "instance": self.instance})
        return None if response.status_code == 204 else response.json()

    def report(self, job_id: int, *, worker_id: int, attempt: int, metrics: list[dict], logs: list[str],
               log_start: int) -> None:
        self._post(f"/jobs/{job_id}/report", {"worker_id": worker_id, "attempt": attempt, "metrics": metrics,
                                              "logs": logs, "log_start": log_start})

    def finish(self, job_id: int, *, worker_id: int, attempt: int, exit_code: int, failure_class: str | None,
               failure_reason: str | None, release: bool) -> None:
        self._post(f"/jobs/{job_id}/finish", {"worker_id": worker_id, "attempt": attempt, "exit_code": exit_code,
                                              "failure_class": failure_class, "failure_reason": failure_reason,
                                              "release": release})
