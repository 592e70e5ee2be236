"""Real processes: a uvicorn server, `python -m worker` agents, torchrun + trainer_core.train on CPU with
the tiny demo model. Every process gets a temp data dir and short leases; teardown kills what is left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from process_utils import FAST_LEASES, REPO, free_port, wait_until_healthy
from worker.runner import find_orphans, kill_groups

@pytest.fixture
def data_dir(tmp_path: Path, tiny_model_dir: Path, demo_data_path: Path) -> Path:
    """The session's tiny model and demo data (tests/conftest.py), copied in: links out of the data root
    are refused, by design."""
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / "models" / "tiny-qwen2")
    (data / "datasets").mkdir()
    shutil.copy(demo_data_path, data / "datasets" / "demo.jsonl")
    return data


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 30) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(2)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGTERM)  # second signal: a worker's cold stop
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
        self.log.close()


class Cluster:
    """One server and its workers, all real processes, sharing one data dir."""

    def __init__(self, data_dir: Path, tmp_path: Path) -> None:
        self.data_dir = data_dir
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Proc | None = None
        self.workers: list[Proc] = []
        self.worker_name = f"it-{os.getpid()}-{self.port}"
        self.worker_names: set[str] = set()
        self.env = {**os.environ, **FAST_LEASES, "PARATRAIN_DATA_DIR": str(data_dir),
                    "PYTHONUNBUFFERED": "1"}
        self.api: httpx.Client | None = None

    def start_server(self) -> None:
        argv = [sys.executable, "-m", "uvicorn", "--factory", "server.main:create_app", "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning"]
        self.server = Proc(argv, self.env, self.tmp_path / "server.log")
        server = self.server
        wait_until_healthy(self.url, lambda: server.popen.poll() is None, log_path=server.log_path)
        token = (self.data_dir / "token").read_text().strip()
        if self.api is None:
            self.api = httpx.Client(base_url=f"{self.url}/api", timeout=30,
                                    headers={"Authorization": f"Bearer {token}"})

    def start_worker(self, name: str = "", **env: str) -> Proc:
        """A `python -m worker` on CPU; `name` is appended to the cluster's worker name (several workers)."""
        full_name = self.worker_name + name
        self.worker_names.add(full_name)
        argv = [sys.executable, "-m", "worker", "--server", self.url, "--token-file",
                str(self.data_dir / "worker_token"), "--name", full_name, "--gpus", "none"]
        worker_env = {**self.env, "PARATRAIN_WORKER_CLAIM_INTERVAL_S": "0.2",
                      "PARATRAIN_WORKER_REPORT_INTERVAL_S": "0.2", "PARATRAIN_WORKER_KILL_GRACE_S": "15", **env}
        proc = Proc(argv, worker_env, self.tmp_path / f"worker{len(self.workers)}.log")
        self.workers.append(proc)
        return proc

    def submit(self, **body) -> dict:
        r = self.api.post("/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: int) -> dict:
        return self.api.get(f"/jobs/{job_id}").json()

    def wait(self, job_id: int, done, timeout: float = 180, what: str = "") -> dict:
        deadline = time.time() + timeout
        while True:
            try:
                job = self.job(job_id)
                if done(job):
                    return job
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what or 'job'}: {self.job(job_id)}\n{self.logs()}")
            time.sleep(0.2)

    def wait_final(self, job_id: int, timeout: float = 180) -> dict:
        return self.wait(job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout, "final")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.tmp_path.glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for proc in self.workers:
            proc.stop()
        if self.server is not None:
            self.server.stop()
        if self.api is not None:
            self.api.close()
        for name in self.worker_names:
            leftovers = find_orphans(f"{name}@{self.url}")  # a worker's identity: name@server
            if leftovers:
                kill_groups(list(leftovers), 5)


@pytest.fixture
def cluster(data_dir: Path, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(data_dir, tmp_path)
    try:
        yield c
    finally:
        c.close()


