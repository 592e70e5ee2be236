"""A few seconds of bench/api_load.py: 50 concurrent clients creating and reading jobs, zero 5xx."""

from __future__ import annotations

import subprocess
import sys

import pytest

from process_utils import REPO

pytestmark = pytest.mark.slow


def test_fifty_clients_get_no_server_errors():
    result = subprocess.run([sys.executable, "bench/api_load.py", "--clients", "50", "--duration", "4"],
                            cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "5xx: 0  connection errors: 0" in result.stdout
    assert "requests/s:" in result.stdout and "p99" in result.stdout
