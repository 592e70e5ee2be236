"""UI test fixtures: the real server app (server.main.create_app, UI mounted) on a free port in a thread,
and a scripted worker that drives jobs through the worker REST endpoints (no torchrun), so the UI can be
tested against real API answers quickly."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

USER_TOKEN = "ui-test-user-token"
WORKER_TOKEN = "ui-test-worker-token"
TINY_CONFIG = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    data_dir: Path
    token: str = USER_TOKEN
    app: Any = None  # the FastAPI app, running in this process

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {token or self.token}"},
                            timeout=30)


@dataclass
class ScriptedWorker:
    """Plays a GPU worker over REST: registers, claims jobs, reports metrics and logs, finishes."""

    base_url: str
    gpu_mem_gb: float = 24.0
    worker_id: int = 0
    attempts: dict[int, int] = field(default_factory=dict)
    log_counts: dict[int, int] = field(default_factory=dict)

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {WORKER_TOKEN}"}, timeout=30)

    def register(self) -> None:
        with self._client() as c:
            r = c.post("/api/workers/register", json={"name": "scripted", "hostname": "test",
                                                      "gpus": [{"index": 0, "name": "Fake GPU", "memory_gb": self.gpu_mem_gb}]})
            r.raise_for_status()
            self.worker_id = r.json()["worker_id"]

    def claim(self) -> dict | None:
        with self._client() as c:
            r = c.post(f"/api/workers/{self.worker_id}/claim", json={"free_gpu_indices": [0]})
            if r.status_code == 204:
                return None
            r.raise_for_status()
            job = r.json()["job"]
            self.attempts[job["id"]] = job["attempt"]
            return job

    def report(self, job_id: int, steps: range, total_steps: int = 100, logs: list[str] | None = None,
               val_every: int | None = None) -> None:
        """Metric points of `steps`, with a validation loss every `val_every` steps. Step 0 is the trainer's
        validation before training: a validation loss alone."""
        metrics = [{"step": s, "epoch": 0, "loss": 5.0 / (1 + 0.1 * s), "lr": 1e-4 * min(1.0, s / 5),
                    "grad_norm": 1.0, "tokens_per_s": 1234.0, "gpu_mem_gb": 3.5, "eta_s": (total_steps - s) * 2.0,
                    "total_steps": total_steps, "tokens_seen": 2048 * s, "train_s": 1.5 * s} if s else
                   {"step": 0, "epoch": 0, "loss": None, "total_steps": total_steps, "tokens_seen": 0, "train_s": 0.0}
                   for s in steps]
        for m in metrics:
            if val_every and m["step"] % val_every == 0:
                m["val_loss"] = 5.5 / (1 + 0.08 * m["step"])
        logs = logs if logs is not None else [f"step {s} loss {m['loss']:.3f}" if s else "step 0 (validation)"
                                              for s, m in zip(steps, metrics)]
        start = self.log_counts.get(job_id, 0)
        with self._client() as c:
            r = c.post(f"/api/jobs/{job_id}/report", json={
                "worker_id": self.worker_id, "attempt": self.attempts[job_id], "log_start": start,
                "metrics": metrics, "logs": logs})
            r.raise_for_status()
        self.log_counts[job_id] = start + len(logs)

    def heartbeat(self, running: list[int]) -> list[int]:
        with self._client() as c:
            r = c.post(f"/api/workers/{self.worker_id}/heartbeat", json={"running_job_ids": running})
            r.raise_for_status()
            return r.json().get("cancel_job_ids", [])

    def finish(self, job_id: int, exit_code: int = 0, **kw) -> None:
        with self._client() as c:
            r = c.post(f"/api/jobs/{job_id}/finish", json={"worker_id": self.worker_id,
                                                           "attempt": self.attempts[job_id], "exit_code": exit_code, **kw})
            r.raise_for_status()


@pytest.fixture
def live_server(tmp_path) -> LiveServer:
    import uvicorn

    from server.main import create_app
    from server.settings import Settings

    port = free_port()
    data_dir = tmp_path / "data"
    # what jobs may name (the server checks they exist): a model dir with a small Qwen2 config.json and data
    (data_dir / "models" / "tiny").mkdir(parents=True)
    (data_dir / "models" / "tiny" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (data_dir / "demo.jsonl").write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(20)))
    settings = Settings(data_dir=data_dir, port=port, user_token=USER_TOKEN, worker_token=WORKER_TOKEN)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/api/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        raise RuntimeError("server did not start")
    yield LiveServer(base, data_dir, app=app)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def scripted_worker(live_server) -> ScriptedWorker:
    worker = ScriptedWorker(live_server.base_url)
    worker.register()
    return worker
