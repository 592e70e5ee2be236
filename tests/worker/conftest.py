"""A live server (uvicorn in a thread, temp data dir, short leases) and in-process worker agents that
launch tests/worker/fake_trainer.py instead of torchrun + trainer_core.train."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.main import create_app
from server.settings import Settings
from worker.agent import Agent
from worker.client import ServerClient
from worker.gpus import detect_gpus
from worker.settings import WorkerSettings

FAKE_TRAINER = str(Path(__file__).with_name("fake_trainer.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.api = httpx.Client(base_url=self.url + "/api", timeout=10,
                                headers={"Authorization": f"Bearer {self.app.state.tokens.user}"})

    def stop(self) -> None:
        self.api.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def wait_for(self, job_id: int, states: set[str], timeout: float = 20) -> dict:
        deadline = time.time() + timeout
        while True:
            job = self.api.get(f"/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            assert time.time() < deadline, f"job {job_id} stayed {job['state']}"
            time.sleep(0.05)


@pytest.fixture
def server_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings of the live server; a test changes some with parametrize(..., indirect=True)."""
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "demo.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")   # what the server checks
    return Settings(**{"data_dir": tmp_path, "port": free_port(), "heartbeat_interval_s": 0.2, "lease_ttl_s": 3.0,
                       "reaper_interval_s": 0.1, "mount_ui": False, "max_attempts": 3, "sse_poll_s": 0.05,
                       **getattr(request, "param", {})})


@pytest.fixture
def live_server(server_settings: Settings) -> Iterator[LiveServer]:
    server = LiveServer(server_settings)
    yield server
    server.stop()


class RunningAgent:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.exit_code = self.agent.run()

    def stop(self, cold: bool = False, timeout: float = 20) -> None:
        self.agent.warm_stop.set()
        if cold:
            self.agent.cold_stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not stop"


@pytest.fixture
def start_agent(live_server: LiveServer) -> Iterator[Callable[..., RunningAgent]]:
    agents: list[RunningAgent] = []

    def start(**overrides) -> RunningAgent:
        settings = WorkerSettings(**{
            "server_url": live_server.url, "token": live_server.app.state.tokens.worker, "name": "test-worker",
            "gpus": "none", "claim_interval_s": 0.1, "report_interval_s": 0.1, "kill_grace_s": 2.0,
            "trainer": [FAKE_TRAINER], "use_torchrun": False, **overrides})
        client = ServerClient(settings.server_url, settings.token)
        running = RunningAgent(Agent(settings, client, detect_gpus(settings.gpus)))
        agents.append(running)
        return running

    yield start
    for running in agents:
        if running.thread.is_alive():
            running.stop(cold=True)


@pytest.fixture
def job_body():
    """A valid JobCreate body; keyword arguments override config fields."""
    def make(*, gpus: int = 0, **config) -> dict:
        return {"config": {"base_model": "models/tiny", "data_path": "datasets/demo.jsonl", "max_steps": 5,
                           **config}, "gpus": gpus}
    return make


@pytest.fixture
def make_server():
    """Start another server (e.g. a restart on the same settings); stopped at teardown."""
    servers: list[LiveServer] = []

    def make(settings: Settings) -> LiveServer:
        servers.append(LiveServer(settings))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()
