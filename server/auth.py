"""Bearer tokens: one for people and the UI, one for workers. Taken from the settings when given
(docker passes them by env), else read from <data_dir>/token and <data_dir>/worker_token, created on
first start."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from server.settings import Settings


@dataclass(frozen=True)
class Tokens:
    user: str
    worker: str


def _load_or_create(path: Path) -> str:
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def ensure_tokens(settings: Settings) -> Tokens:
    user = settings.user_token or _load_or_create(settings.data_dir / "token")
    worker = settings.worker_token or _load_or_create(settings.data_dir / "worker_token")
    if secrets.compare_digest(user, worker):
        raise ValueError("the user token and the worker token must differ")
    return Tokens(user=user, worker=worker)


def token_matches(given: str | None, expected: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())
