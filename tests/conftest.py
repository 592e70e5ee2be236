"""Shared fixtures: a tiny random Qwen2 model + locally trained tokenizer and the demo dataset, built once
per test session with the same commands users run (`paratrain make-tiny-model`, `make-demo-data`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_token_cache(tmp_path_factory):
    """Token caches go to a per-session folder (inherited by subprocesses), never ~/.cache."""
    os.environ["PARATRAIN_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trainer_core.demo import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def demo_data_path(tmp_path_factory) -> Path:
    from trainer_core.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("datasets") / "demo.jsonl")


@pytest.fixture(scope="session")
def postgres_cluster():
    """One throwaway PostgreSQL server for the session (tests/pg_cluster.py). Missing PostgreSQL skips the
    PostgreSQL variants locally; under CI (setup installs it) it is an error."""
    import pg_cluster

    if not pg_cluster.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (scripts/setup.sh --test installs it)")
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh --test installs it)")
    cluster = pg_cluster.Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
