"""Thin client of the paratrain REST API (docs/API.md) — the only way the UI reaches jobs and data.

One `ApiClient` per callback: it holds the server's base URL and the user's token (from the session's
gr.State), never logs the token, and turns every non-2xx answer into `ApiError` with the server's
`detail` so callbacks can show it as is.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from trainer_core.config import BEST_ADAPTER_DIR

TIMEOUT_S = 15.0


class ApiError(Exception):
    """A failed API call: the HTTP status (0 when the server could not be reached) and a readable message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # FastAPI validation errors: [{loc, msg}, ...], named as the form and a job
        detail = "; ".join(      # file name them: data_path, not body.config.data_path
            f"{_field_name(d.get('loc', []))}: {d.get('msg', d)}" if isinstance(d, dict) else str(d) for d in detail)
    if not str(detail) or str(detail) == response.reason_phrase:   # no detail of ours: a proxy, a wrong URL
        return f"{response.status_code} {response.reason_phrase}"
    return str(detail)


def _field_name(loc: list) -> str:
    return ".".join(str(p) for p in loc if p not in ("body", "config")) or "config"


def stopped_early(job: dict[str, Any]) -> bool:
    """A job (as the API returns it) that succeeded before its last step: --early_stop_patience ended it."""
    return (job.get("state") == "succeeded" and bool(job.get("config", {}).get("early_stop_patience"))
            and (job.get("step") or 0) < (job.get("total_steps") or 0))


def improvement_text(cfg: dict[str, Any]) -> str:
    """What a job's early stop counts as an improvement: 'a lower loss', or 'a loss lower by more than 0.01'."""
    min_delta = cfg.get("early_stop_min_delta")
    return f"a loss lower by more than {min_delta:g}" if min_delta else "a lower loss"


class ApiClient:
    def __init__(self, base_url: str, token: str | None, transport: httpx.BaseTransport | None = None,
                 timeout_s: float = TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self._token = token or ""
        self._transport = transport
        self._timeout_s = timeout_s

    def __repr__(self) -> str:  # never show the token
        return f"ApiClient({self.base_url!r})"

    # --- plumbing ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            with httpx.Client(base_url=self.base_url, timeout=self._timeout_s, transport=self._transport) as client:
                response = client.request(method, path, headers=headers, **kw)
        except httpx.HTTPError as e:
            raise ApiError(0, f"The server at {self.base_url} could not be reached ({type(e).__name__}).") from e
        if response.status_code == 401:
            raise ApiError(401, "The token was not accepted: check it and log in again.")
        if response.status_code >= 500:
            raise ApiError(response.status_code, f"server error {response.status_code}: {_detail(response)}")
        if response.status_code >= 400:   # the request's fault, and the detail says which part
            raise ApiError(response.status_code, _detail(response))
        return response

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        response = self._request(method, path, **kw)
        return None if response.status_code == 204 or not response.content else response.json()

    # --- session ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/api/health")

    def check_token(self) -> None:
        """Raises ApiError(401) for a wrong token; any authenticated endpoint would do."""
        self._json("GET", "/api/jobs", params={"limit": 1})

    # --- jobs ---------------------------------------------------------------------------------------
    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self._json("GET", "/api/jobs", params=params)["data"]

    def get_job(self, job_id: int) -> dict[str, Any]:
        return self._json("GET", f"/api/jobs/{job_id}")

    def submit_job(self, job: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/api/jobs", json=job)

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        return self._json("POST", f"/api/jobs/{job_id}/cancel")

    def retry_job(self, job_id: int) -> dict[str, Any]:
        return self._json("POST", f"/api/jobs/{job_id}/retry")

    def metrics(self, job_id: int, since_step: int = -1) -> list[dict[str, Any]]:
        return self._json("GET", f"/api/jobs/{job_id}/metrics", params={"since_step": since_step})["data"]

    def logs(self, job_id: int, offset: int = 0, limit: int = 1000) -> dict[str, Any]:
        return self._json("GET", f"/api/jobs/{job_id}/logs", params={"offset": offset, "limit": limit})

    def artifacts(self, job_id: int) -> list[dict[str, Any]]:
        return self._json("GET", f"/api/jobs/{job_id}/artifacts")["data"]

    def download_artifact(self, job_id: int, path: str) -> bytes:
        return self._request("GET", f"/api/jobs/{job_id}/artifacts/{path}").content

    def best_adapter(self, job_id: int) -> tuple[int, float] | None:
        """(step, validation loss) of the job's adapter_best/, as its validation.json says (the trainer's record:
        it restarts with a new validation set, which the metrics do not tell), or None."""
        try:
            record = json.loads(self.download_artifact(job_id, f"{BEST_ADAPTER_DIR}/validation.json"))
            return int(record["step"]), float(record["val_loss"])
        except (ApiError, ValueError, KeyError, TypeError):
            return None

    def command_preview(self, job: dict[str, Any]) -> list[str]:
        return self._json("POST", "/api/command-preview", json=job)["argv"]

    # --- data, memory, workers ------------------------------------------------------------------------
    def check_dataset(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/api/datasets/check", json=body)

    def estimate(self, config: dict[str, Any], gpu_mem_gb: float, measured: list[dict[str, Any]] | None = None,
                 tokens_per_text: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"config": config, "gpu_mem_gb": gpu_mem_gb}
        if measured:
            body["measured"] = measured
        if tokens_per_text:
            body["tokens_per_text"] = tokens_per_text
        return self._json("POST", "/api/estimate", json=body)

    def presets(self, gpu_mem_gb: float, model: str) -> list[dict[str, Any]]:
        return self._json("GET", "/api/presets", params={"gpu_mem_gb": gpu_mem_gb, "model": model})

    def workers(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/workers")["data"]
