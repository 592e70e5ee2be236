"""An in-process app on a temp data dir (never ./.paratrain) with short leases, plus authed clients."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.main import create_app
from server.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path: Path) -> Settings:
    """Every server test runs on both databases: SQLite (the default) and PostgreSQL (a fresh database on
    the session's throwaway server)."""
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "demo.jsonl").write_text('{"main": "m", "branches": ["a", "b"]}\n')
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")   # what the server checks
    database_url = request.getfixturevalue("postgres_cluster").new_database() if request.param == "postgresql" else ""
    return Settings(data_dir=tmp_path, database_url=database_url, heartbeat_interval_s=0.2, lease_ttl_s=2.0,
                    reaper_interval_s=0.1, mount_ui=False, max_attempts=2, sse_poll_s=0.05)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {c.app.state.tokens.user}"
        yield c


@pytest.fixture
def worker_headers(client: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.app.state.tokens.worker}"}


@pytest.fixture
def job_body():
    """A valid JobCreate body; keyword arguments override config fields."""
    def make(**config) -> dict:
        return {"config": {"base_model": "models/tiny", "data_path": "datasets/demo.jsonl", "max_steps": 3,
                           **config}, "gpus": 0}
    return make


def race_workers(settings: Settings, count: int, claim_loop: Callable[..., None]) -> None:
    """Workers w0..w{count-1}, each in a thread with its own connections (like separate server processes):
    registers itself, then runs `claim_loop(engine, worker_id, name)`. Fails with what any thread raised."""
    from sqlmodel import Session

    from server import queue
    from server.db import make_engine, write_engine
    from server.models import WorkerRegister

    errors: list[BaseException] = []

    def run(name: str) -> None:
        engine = write_engine(make_engine(settings.database_url))
        try:
            with Session(engine) as session:
                worker = queue.register_worker(session=session, registration=WorkerRegister(name=name))
                session.commit()
                worker_id = worker.id
            claim_loop(engine, worker_id, name)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
