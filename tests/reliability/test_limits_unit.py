"""In-process: body size limit, integrity endpoint, non-UTF-8 and huge-line datasets, worker secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.main import create_app
from server.settings import Settings


@pytest.fixture
def small_client(tmp_path: Path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "demo.jsonl").write_text('{"main": "m", "branches": ["a", "b"]}\n')
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")   # what the server checks
    settings = Settings(data_dir=tmp_path, mount_ui=False, max_body_mb=0.01)  # ~10 kB
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {c.app.state.tokens.user}"
        yield c


def test_oversized_body_is_413_with_a_clear_message(small_client):
    big = {"config": {"base_model": "models/tiny", "data_path": "datasets/demo.jsonl", "name": "x" * 20_000}}
    r = small_client.post("/api/jobs", json=big)
    assert r.status_code == 413
    assert "PARATRAIN_MAX_BODY_MB" in r.json()["detail"]


def test_oversized_chunked_body_is_413(small_client):
    def chunks():
        for _ in range(20):
            yield b"x" * 1024
    r = small_client.post("/api/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text


def test_oversized_body_without_a_token_is_refused(small_client):
    r = small_client.post("/api/jobs", content=b"x" * 50_000, headers={"Authorization": ""})
    assert r.status_code in (401, 413)


def test_small_bodies_still_pass(small_client):
    r = small_client.post("/api/jobs", json={"config": {"base_model": "models/tiny",
                                                        "data_path": "datasets/demo.jsonl"}, "gpus": 0})
    assert r.status_code == 201, r.text


def test_integrity_endpoint(client):
    r = client.get("/api/integrity")
    assert r.status_code == 200 and r.json() == {"ok": True, "problems": []}
    assert client.get("/api/integrity", headers={"Authorization": ""}).status_code == 401


def test_integrity_finds_broken_rows(client, job_body):
    from sqlalchemy import text
    from sqlmodel import Session

    from server.integrity import check_integrity

    job_id = client.post("/api/jobs", json=job_body()).json()["id"]
    engine = client.app.state.write_engine
    with Session(engine) as s:
        s.exec(text(f"UPDATE job SET state = 'running' WHERE id = {job_id}"))  # no worker, no lease
        s.commit()
    with Session(engine) as s:
        problems = check_integrity(s)
    assert any("running jobs without a worker or lease" in p for p in problems), problems
    assert any("last state event disagrees" in p for p in problems), problems


def test_non_utf8_dataset_is_a_clear_422_or_error(client, settings):
    (settings.data_dir / "datasets" / "latin1.jsonl").write_bytes('{"main": "caf\xe9", "branches": ["a"]}\n'
                                                                   .encode("latin-1"))
    r = client.post("/api/datasets/check", json={"data_path": "datasets/latin1.jsonl"})
    assert r.status_code == 200, r.text
    errors = r.json()["errors"]
    assert errors and "utf-8" in errors[0].lower() and "latin1.jsonl:1" in errors[0], errors


def test_huge_jsonl_line_is_reported_not_a_crash(client, settings):
    path = settings.data_dir / "datasets" / "huge.jsonl"
    with open(path, "w") as f:
        f.write('{"main": "' + "a" * (64 * 1024 * 1024) + '", "branches": ["b"]}\n')
        f.write("{not json\n")
    r = client.post("/api/datasets/check", json={"data_path": "datasets/huge.jsonl"})
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert any("huge.jsonl:2" in e for e in body["errors"]) or body.get("records") == 1, str(body)[:500]
    assert len(r.content) < 100_000  # the line is not echoed back


def test_dataset_path_outside_roots_and_binary_garbage(client, settings, tmp_path):
    r = client.post("/api/datasets/check", json={"data_path": "../../etc/passwd"})
    assert r.status_code == 422 and "outside the allowed roots" in r.text
    assert str(settings.data_dir.resolve()) in r.text and "PARATRAIN_EXTRA_ROOTS" in r.text   # which, and how to add
    (settings.data_dir / "datasets" / "bin.jsonl").write_bytes(bytes(range(256)) * 10)
    r = client.post("/api/datasets/check", json={"data_path": "datasets/bin.jsonl"})
    assert r.status_code == 200 and r.json()["errors"], r.text
    r = client.post("/api/jobs", json={"config": {"base_model": "models/tiny", "data_path": "datasets/\x00x"}})
    assert r.status_code == 422, r.text
