"""Reuses the fixtures of tests/server (in-process app) and tests/integration (real processes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "integration"))  # process_utils


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_server = _load("_server_conftest", TESTS / "server" / "conftest.py")
_integration = _load("_integration_conftest", TESTS / "integration" / "conftest.py")

settings = _server.settings
client = _server.client
worker_headers = _server.worker_headers
job_body = _server.job_body
data_dir = _integration.data_dir
cluster = _integration.cluster
Cluster = _integration.Cluster
