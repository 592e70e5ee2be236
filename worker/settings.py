"""Worker settings (env prefix PARATRAIN_WORKER_; `paratrain worker` flags override them)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer_core.command import DEFAULT_TRAINER


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARATRAIN_WORKER_", extra="ignore")

    server_url: str = Field("http://127.0.0.1:8000", description="The server's URL.")
    token: str = Field("", description="The server's worker token (<data_dir>/worker_token).")
    name: str = Field(default_factory=socket.gethostname, min_length=1,
                      description="Worker name, unique per server: registering again under a name re-queues "
                      "that name's jobs.")
    gpus: str = Field("auto", description="'auto' (NVML), 'none' (CPU only) or indices like '0,1,3'.")
    max_cpu_jobs: int = Field(1, ge=0, description="CPU jobs (gpus=0) run at the same time.")
    rdzv_address: str | None = Field(default_factory=socket.gethostname,
                                     description="How other workers reach this machine for multi-node jobs' "
                                     "rendezvous (an address or resolvable name); empty: take no multi-node jobs.")
    claim_interval_s: float = Field(1.0, gt=0, description="How often to ask for work while nothing is claimed.")
    report_interval_s: float = Field(0.5, gt=0, description="Metrics and log lines are sent in batches this often.")
    stop_mode: Literal["warm", "cold"] = Field(
        "warm", description="What the first SIGTERM/SIGINT does: 'warm' claims nothing more and lets running jobs "
        "finish (a second signal is cold); 'cold' at once stops them with a checkpoint and hands them back, for "
        "containers, which get one SIGTERM and then SIGKILL (`docker compose stop`).")
    kill_grace_s: float = Field(30.0, ge=0, description="SIGTERM -> this long -> SIGKILL for a job's process group.")
    request_timeout_s: float = Field(10.0, gt=0)
    health_file: Path | None = Field(None, description="Touched after every accepted heartbeat (container "
                                     "health checks look at its age).")

    @field_validator("server_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} needs its scheme: http://{url}")
        return url.rstrip("/")

    @field_validator("gpus")
    @classmethod
    def _gpu_spec(cls, spec: str) -> str:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if spec.strip().lower() not in ("auto", "none", "cpu", "") and not all(p.isdigit() for p in parts):
            raise ValueError(f"{spec!r} is not 'auto', 'none' or GPU indices like '0,1'")
        return spec

    @property
    def identity(self) -> str:
        """Name and server together mark this worker's processes: two workers of the same name on one host
        (two `paratrain serve` instances, a test suite beside a real server) never touch each other's runs."""
        return f"{self.name}@{self.server_url}"

    trainer: list[str] = Field(default_factory=lambda: list(DEFAULT_TRAINER),
                               description="What torchrun runs (tests use a fake trainer script).")
    use_torchrun: bool = Field(True, description="False runs the trainer with plain python (tests only).")
