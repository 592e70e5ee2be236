"""Server settings: one pydantic-settings object, read from the environment (prefix PARATRAIN_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


SERVER_URL_FILE = "server_url"   # in the data dir: serve's local URL, where `paratrain submit` looks for it


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARATRAIN_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".paratrain"), description="Holds the DB, tokens, demo assets and job outputs.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite at <data_dir>/paratrain.db.")
    data_root: Path | None = Field(None, description="Datasets and models must lie under it; default data_dir.")
    extra_roots: list[Path] = Field(default_factory=list,
                                    description="More directories jobs may read from (a relative one is taken from the "
                                                "server's working directory).")
    mount_ui: bool = Field(True, description="Serve the Gradio UI at /ui when the ui package imports.")
    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 exposes the API to the network.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the API and the UI.")

    # Tokens: taken from here when set (docker), else read from / created in <data_dir>/token, worker_token.
    user_token: str = ""
    worker_token: str = ""

    heartbeat_interval_s: float = Field(5.0, gt=0)
    lease_ttl_s: float = Field(30.0, gt=0, description="A running job whose lease is this old is re-queued.")
    reaper_interval_s: float = Field(1.0, gt=0)
    max_attempts: int = Field(3, ge=1, description="Runs of a job (the first and its re-queues) before it fails with 'lost'.")
    gang_wait_s: float = Field(300.0, gt=0, description="A multi-node job's reservations are released when its "
                               "gang is not complete after this long (two half-formed gangs never wait forever).")
    sse_poll_s: float = Field(0.25, gt=0, description="How often an SSE stream looks for new events.")
    sse_ping_s: float = Field(15.0, gt=0)
    max_log_line_chars: int = Field(4000, ge=100, description="Kept of a log line (a [node K] prefix on top); "
                                    "a longer one is cut, saying how much.")
    max_body_mb: float = Field(16.0, gt=0, description="Request bodies larger than this are refused with 413.")

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().absolute()
        if self.data_root is None:
            self.data_root = self.data_dir
        self.data_root = self.data_root.expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'paratrain.db'}"
        if self.lease_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("lease_ttl_s must be longer than heartbeat_interval_s")
        return self

    @property
    def local_url(self) -> str:
        """How a process on this machine reaches the server (a wildcard bind is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"   # IPv6: [::1]

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def read_roots(self) -> list[Path]:
        """Directories a job's dataset and base model may come from."""
        assert self.data_root is not None
        return [self.data_root, *self.extra_roots]


@lru_cache
def get_settings() -> Settings:
    return Settings()
