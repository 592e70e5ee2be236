"""Queue semantics: atomic claims under concurrency, leases and the reaper, reports, finish, SSE resume."""

from __future__ import annotations

import json
import threading
import time

from sqlmodel import Session

from server import queue
from server.main import create_app, reap_once
from server.models import ClaimRequest
from tests.server.conftest import race_workers
from trainer_core.config import TrainConfig


def _register(client, worker_headers, name="w", gpus=()):
    r = client.post("/api/workers/register", json={"name": name, "gpus": [{"index": i} for i in gpus]},
                    headers=worker_headers)
    return r.json()["worker_id"]


def test_concurrent_claimers_never_share_a_job(settings, job_body):
    from fastapi.testclient import TestClient

    # No lifespan, so no reaper: a slow run must not see leases expire and jobs legitimately re-queued.
    client = TestClient(create_app(settings))
    client.headers["Authorization"] = f"Bearer {client.app.state.tokens.user}"
    for _ in range(40):
        assert client.post("/api/jobs", json=job_body()).status_code == 201
    claimed: list[int] = []
    lock = threading.Lock()

    def claim_until_empty(engine, worker_id: int, name: str) -> None:
        while True:
            with Session(engine) as session:
                worker = queue.get_worker(session=session, worker_id=worker_id)
                got = queue.claim_job(session=session, worker=worker, request=ClaimRequest(), settings=settings)
                job_id = got.job.id if got else None
                session.commit()
            if job_id is None:
                return
            with lock:
                claimed.append(job_id)

    race_workers(settings, 8, claim_until_empty)
    assert len(claimed) == 40 and len(set(claimed)) == 40


def test_a_job_still_exiting_on_a_worker_is_not_offered_to_it_again(client, worker_headers, job_body):
    """A re-queued job whose old attempt is still saving on this worker goes to another one (or waits):
    two attempts on one machine would write the same output dir at once."""
    first = client.post("/api/jobs", json=job_body()).json()["id"]
    second = client.post("/api/jobs", json=job_body()).json()["id"]
    wid = _register(client, worker_headers)

    def claim(busy):
        r = client.post(f"/api/workers/{wid}/claim", json={"busy_job_ids": busy}, headers=worker_headers)
        return r.json()["job"]["id"] if r.status_code == 200 else None

    assert claim([first]) == second
    assert claim([first, second]) is None
    assert claim([second]) == first


def test_a_launch_whose_answer_was_lost_is_offered_again_as_it_was(client, worker_headers, job_body):
    """The claim's answer never reached the worker (a timeout while the server committed it): its next claim,
    which does not list the job among those it runs, gets the same attempt again instead of letting it lapse."""
    job_id = client.post("/api/jobs", json=job_body()).json()["id"]
    wid = _register(client, worker_headers)

    def claim(**body):
        r = client.post(f"/api/workers/{wid}/claim", json=body, headers=worker_headers)
        return r.json()["job"] if r.status_code == 200 else None

    first = claim(busy_job_ids=[])
    again = claim(busy_job_ids=[])
    assert (again["id"], again["attempt"]) == (job_id, first["attempt"])
    assert claim(busy_job_ids=[job_id]) is None      # it runs it now
    assert claim() is None                           # a worker that does not say what it runs: nothing re-offered
    assert any("offered again to worker w" in x["line"] for x in client.get(f"/api/jobs/{job_id}/logs").json()["data"])


def test_a_claim_names_the_config_fields_the_job_leaves_at_their_defaults(client, worker_headers, job_body):
    """What a worker older than the server may drop (see worker.agent): only fields at the server's defaults,
    compared as the database holds them (JSON), never one the job sets."""
    client.post("/api/jobs", json=job_body(lora_rank=4, init_adapter=None, early_stop_min_delta=0.0))
    wid = _register(client, worker_headers)
    claim = client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).json()
    at_default = set(claim["default_fields"])
    assert {"init_adapter", "early_stop_min_delta", "lora_alpha", "rope_2d_ratio"} <= at_default
    assert not at_default & {"lora_rank", "base_model", "data_path", "output_dir", "max_steps"}


def test_lost_lease_requeues_then_fails_with_reason(client, worker_headers, job_body, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="paratrain.server")
    job = client.post("/api/jobs", json=job_body()).json()  # max_attempts 2 (settings)
    wid = _register(client, worker_headers)
    assert client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).json()["job"]["id"] == job["id"]
    # heartbeats renew the lease past its TTL (2 s)
    for _ in range(14):
        reply = client.post(f"/api/workers/{wid}/heartbeat", json={"running_job_ids": [job["id"]]},
                            headers=worker_headers).json()
        assert reply == {"cancel_job_ids": []}
        time.sleep(0.2)
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
    # silence: the reaper re-queues it as attempt 2
    deadline = time.time() + 10
    while client.get(f"/api/jobs/{job['id']}").json()["state"] != "queued":
        assert time.time() < deadline
        time.sleep(0.1)
    again = client.get(f"/api/jobs/{job['id']}").json()
    assert again["attempt"] == 2 and again["worker_id"] is None
    # the old worker learns the job is no longer its own
    reply = client.post(f"/api/workers/{wid}/heartbeat", json={"running_job_ids": [job["id"]]},
                        headers=worker_headers).json()
    assert reply == {"cancel_job_ids": [job["id"]]}
    client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers)
    deadline = time.time() + 10
    while client.get(f"/api/jobs/{job['id']}").json()["state"] != "failed":
        assert time.time() < deadline
        time.sleep(0.1)
    failed = client.get(f"/api/jobs/{job['id']}").json()
    assert failed["failure_class"] == "lost" and "2 attempts" in failed["failure_reason"]
    # the job's log says why; the operator's log says it once, in the transition's line
    logs = client.get(f"/api/jobs/{job['id']}/logs").json()
    assert any("gave up after 2 attempts" in line["line"] for line in logs["data"]), logs
    said = [r.getMessage() for r in caplog.records if "gave up after" in r.getMessage()]
    assert len(said) == 1 and "running -> failed (lost: " in said[0], said


def test_reports_alone_keep_the_lease_like_heartbeats(settings, client, worker_headers, job_body):
    """A report is proof of life: a worker whose heartbeat thread is late but whose reports arrive keeps
    its job past the lease TTL."""
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)
    until = time.time() + 1.5 * settings.lease_ttl_s
    step = 0
    while time.time() < until:
        step += 1
        r = client.post(f"/api/jobs/{job_id}/report", headers=worker_headers,
                        json={"worker_id": wid, "attempt": attempt, "metrics": [{"step": step, "loss": 1.0}]})
        assert r.status_code == 200, r.text   # 409 once the reaper took the job away
        time.sleep(0.2)
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["state"] == "running" and job["attempt"] == 1 and job["step"] == step


def test_a_job_whose_worker_goes_silent_while_cancelling_ends_cancelled_not_requeued(client, worker_headers,
                                                                                      job_body):
    """The user asked to stop it: losing its worker must not start it again elsewhere."""
    client.post("/api/jobs", json=job_body())  # max_attempts 2 (settings): a re-queue would be allowed
    wid = _register(client, worker_headers)
    job_id, _ = _run_one(client, worker_headers, wid)
    assert client.post(f"/api/jobs/{job_id}/cancel").json()["cancel_requested"]
    deadline = time.time() + 10   # no heartbeat: the lease (2 s) runs out
    while (job := client.get(f"/api/jobs/{job_id}").json())["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.1)
    assert job["state"] == "cancelled" and job["attempt"] == 1 and job["worker_id"] is None, job
    assert job["failure_class"] == "cancelled" and "while cancelling" in job["failure_reason"]
    assert client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).status_code == 204


def test_reregistering_releases_the_old_jobs_at_once(client, worker_headers, job_body):
    job = client.post("/api/jobs", json=job_body()).json()
    wid = _register(client, worker_headers, name="box")
    client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers)
    assert _register(client, worker_headers, name="box") == wid
    again = client.get(f"/api/jobs/{job['id']}").json()
    assert again["state"] == "queued" and again["attempt"] == 2


def test_a_worker_that_leaves_is_offline_at_once_and_online_again_when_it_registers(
        client, worker_headers, job_body):
    job = client.post("/api/jobs", json=job_body()).json()
    wid = _register(client, worker_headers, name="box")
    client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers)

    def listed():
        return next(w for w in client.get("/api/workers").json()["data"] if w["id"] == wid)

    assert listed()["online"] is True and listed()["left_at"] is None
    assert client.post(f"/api/workers/{wid}/leave", json={}, headers=worker_headers).status_code == 204
    assert listed()["online"] is False and listed()["left_at"] is not None   # not after a TTL: now
    again = client.get(f"/api/jobs/{job['id']}").json()    # what it still held is not stranded with it
    assert again["state"] == "queued" and again["worker_id"] is None
    r = client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers)   # it left: it takes no job
    assert r.status_code == 409 and "left" in r.json()["detail"], r.text
    r = client.post(f"/api/workers/{wid}/heartbeat", json={"running_job_ids": []}, headers=worker_headers)
    assert r.status_code == 409 and "registers again" in r.json()["detail"], r.text   # the agent then does
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "queued"
    assert _register(client, worker_headers, name="box") == wid
    assert listed()["online"] is True and listed()["left_at"] is None
    assert client.post("/api/workers/999/leave", json={}, headers=worker_headers).status_code == 404


def test_a_database_of_an_older_version_gains_the_new_columns_and_keeps_its_rows(settings):
    """Worker.left_at came after the first release: an existing database file must keep working."""
    from sqlalchemy import inspect, text

    from server.db import init_db, make_engine

    engine = make_engine(settings.database_url)
    with engine.begin() as conn:   # the worker table as the previous version made it
        conn.execute(text("CREATE TABLE worker (id BIGINT PRIMARY KEY, name VARCHAR NOT NULL, hostname VARCHAR "
                          "NOT NULL, gpus JSON NOT NULL, registered_at TIMESTAMP NOT NULL, "
                          "last_heartbeat_at TIMESTAMP NOT NULL)"))
        conn.execute(text("INSERT INTO worker VALUES (7, 'old', 'h', '[]', '2026-01-01', '2026-01-01')"))
    init_db(engine)
    init_db(engine)   # idempotent
    assert "left_at" in {c["name"] for c in inspect(engine).get_columns("worker")}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name, left_at FROM worker WHERE id = 7")).one() == ("old", None)
    engine.dispose()


def _run_one(client, worker_headers, wid):
    claim = client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).json()
    return claim["job"]["id"], claim["job"]["attempt"]


def test_printed_text_with_a_lone_surrogate_is_kept_with_a_replacement_character(client, worker_headers,
                                                                                  job_body):
    """A worker of another make may send what JSON allows and UTF-8 cannot hold ("\\udcff"): the batch (its
    other lines, its metrics) and the job's end are stored, not lost to a 500."""
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)
    body = ('{"worker_id": %d, "attempt": %d, "log_start": 0, "logs": ["ok", "bad \\udcff"], '
            '"metrics": [{"step": 1, "loss": 2.0}]}' % (wid, attempt))
    headers = {**worker_headers, "Content-Type": "application/json"}
    assert client.post(f"/api/jobs/{job_id}/report", content=body, headers=headers).status_code == 200
    lines = [x["line"] for x in client.get(f"/api/jobs/{job_id}/logs").json()["data"]]
    assert lines[-2:] == ["ok", "bad \ufffd"]
    assert [m["step"] for m in client.get(f"/api/jobs/{job_id}/metrics").json()["data"]] == [1]
    body = ('{"worker_id": %d, "attempt": %d, "exit_code": 1, "failure_class": "crash", '
            '"failure_reason": "bad \\udcff"}' % (wid, attempt))
    assert client.post(f"/api/jobs/{job_id}/finish", content=body, headers=headers).status_code == 200
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["state"] == "failed" and job["failure_reason"] == "bad \ufffd"
    r = client.post(f"/api/workers/{wid}/claim", json={"busy_job_ids": [2**63]}, headers=worker_headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "busy_job_ids"], r.text


def test_reports_are_idempotent_and_a_rerun_step_replaces(client, worker_headers, job_body):
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)
    body = {"worker_id": wid, "attempt": attempt, "log_start": 0, "logs": ["a", "b"],
            "metrics": [{"step": 1, "loss": 2.0, "total_steps": 3}, {"step": 2, "loss": float("nan")}]}
    for _ in range(2):  # the answer to the first one was "lost": the worker sends it again
        r = client.post(f"/api/jobs/{job_id}/report", content=json.dumps(body),
                        headers={**worker_headers, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
    body = {"worker_id": wid, "attempt": attempt, "log_start": 1, "logs": ["b", "c"],
            "metrics": [{"step": 2, "loss": 1.5}]}
    assert client.post(f"/api/jobs/{job_id}/report", json=body, headers=worker_headers).status_code == 200
    metrics = client.get(f"/api/jobs/{job_id}/metrics").json()["data"]
    assert [(m["step"], m["loss"]) for m in metrics] == [(1, 2.0), (2, 1.5)]
    later = client.get(f"/api/jobs/{job_id}/metrics", params={"since_step": 1}).json()["data"]
    assert [m["step"] for m in later] == [2]
    logs = client.get(f"/api/jobs/{job_id}/logs").json()
    worker_lines = [x["line"] for x in logs["data"] if not x["line"].startswith("[paratrain]")]
    assert worker_lines == ["a", "b", "c"]
    page = client.get(f"/api/jobs/{job_id}/logs", params={"offset": 1, "limit": 2}).json()
    assert [x["seq"] for x in page["data"]] == [1, 2] and page["next_offset"] == 3
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["step"] == 2 and job["total_steps"] == 3 and job["last_loss"] == 1.5
    # a later attempt back-fills step 3 from metrics.jsonl without its old ETA: the point is not new, so
    # the job keeps its ETA
    body = {"worker_id": wid, "attempt": attempt, "log_start": 3, "logs": [], "metrics": [
        {"step": 3, "loss": 1.2, "eta_s": 4.0}]}
    assert client.post(f"/api/jobs/{job_id}/report", json=body, headers=worker_headers).status_code == 200
    body["metrics"] = [{"step": 3, "loss": 1.2, "eta_s": None}]
    assert client.post(f"/api/jobs/{job_id}/report", json=body, headers=worker_headers).status_code == 200
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["step"] == 3 and job["eta_s"] == 4.0
    # another worker (or a stale attempt) cannot report
    bad = {**body, "attempt": attempt + 1}
    assert client.post(f"/api/jobs/{job_id}/report", json=bad, headers=worker_headers).status_code == 409


def test_the_validation_loss_is_stored_with_its_step_and_step_0_is_served_by_default(client, worker_headers,
                                                                                     job_body):
    client.post("/api/jobs", json=job_body(val_ratio=0.1))
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)
    points = [{"step": 0, "loss": None, "val_loss": 7.2, "total_steps": 4, "tokens_seen": 0, "train_s": 0.0},
              {"step": 1, "loss": 7.1, "tokens_seen": 3_000_000_000, "train_s": 1.5},
              {"step": 2, "loss": 6.9, "val_loss": 7.0}, {"step": 3, "loss": 6.8, "val_loss": float("inf")}]
    body = {"worker_id": wid, "attempt": attempt, "log_start": 0, "logs": [], "metrics": points}
    assert client.post(f"/api/jobs/{job_id}/report", content=json.dumps(body),
                       headers={**worker_headers, "Content-Type": "application/json"}).status_code == 200
    metrics = client.get(f"/api/jobs/{job_id}/metrics").json()["data"]
    assert [(m["step"], m["loss"], m["val_loss"]) for m in metrics] == [
        (0, None, 7.2), (1, 7.1, None), (2, 6.9, 7.0), (3, 6.8, None)]   # infinity is no JSON: missing
    # what the Compare tab plots against; a long run's token count passes 2**31
    assert [(m["tokens_seen"], m["train_s"]) for m in metrics] == [(0, 0.0), (3_000_000_000, 1.5), (None, None),
                                                                   (None, None)]
    assert [m["step"] for m in client.get(f"/api/jobs/{job_id}/metrics", params={"since_step": 0}).json()["data"]] \
        == [1, 2, 3]
    job = client.get(f"/api/jobs/{job_id}").json()
    assert (job["last_loss"], job["last_val_loss"], job["step"]) == (6.8, 7.0, 3)


def test_finish_classes(client, worker_headers, job_body):
    wid = _register(client, worker_headers)
    outcomes = {}
    for exit_code, failure_class in [(0, None), (2, "data"), (3, "oom"), (-9, "crash")]:
        client.post("/api/jobs", json=job_body())
        job_id, attempt = _run_one(client, worker_headers, wid)
        r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,
                        json={"worker_id": wid, "attempt": attempt, "exit_code": exit_code,
                              "failure_class": failure_class, "failure_reason": "why"})
        outcomes[exit_code] = r.json()
    assert outcomes[0]["state"] == "succeeded" and outcomes[0]["failure_class"] is None
    assert outcomes[2]["state"] == "failed" and outcomes[2]["failure_class"] == "data"
    assert outcomes[3]["failure_class"] == "oom" and outcomes[-9]["failure_class"] == "crash"
    assert outcomes[-9]["exit_code"] == -9 and outcomes[-9]["finished_at"]
    # a failure the worker gave no words for still says what it was (found by the API fuzz)
    client.post("/api/jobs", json=job_body())
    job_id, attempt = _run_one(client, worker_headers, wid)
    r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,
                    json={"worker_id": wid, "attempt": attempt, "exit_code": 3, "failure_class": "oom"})
    assert r.json()["state"] == "failed" and r.json()["failure_reason"] == "oom, exit code 3"
    # release: back to the queue as the next attempt
    client.post("/api/jobs", json=job_body())
    job_id, attempt = _run_one(client, worker_headers, wid)
    r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,
                    json={"worker_id": wid, "attempt": attempt, "exit_code": 0, "release": True})
    assert r.json()["state"] == "queued" and r.json()["attempt"] == attempt + 1
    assert r.json()["max_attempts"] == 3        # the hand-back does not use up the budget (2 here)
    # lost (stopped from outside the worker): again, but only up to max_attempts, unlike release
    states = []
    for _ in range(2):
        job_id, attempt = _run_one(client, worker_headers, wid)
        r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,
                        json={"worker_id": wid, "attempt": attempt, "exit_code": 0, "failure_class": "lost",
                              "failure_reason": "stopped by a signal"})
        states.append(r.json()["state"])
    assert states == ["queued", "failed"] and r.json()["failure_class"] == "lost"
    assert "stopped by a signal; gave up after 3 attempts" in r.json()["failure_reason"]


def test_cancel_running_goes_through_the_worker(client, worker_headers, job_body):
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)
    report = {"worker_id": wid, "attempt": attempt, "log_start": 0, "metrics": [], "logs": ["step 1"]}
    r = client.post(f"/api/jobs/{job_id}/report", json=report, headers=worker_headers)
    assert r.json() == {"cancel_requested": False}
    job = client.post(f"/api/jobs/{job_id}/cancel").json()
    assert job["state"] == "running" and job["cancel_requested"]
    # the worker learns it from its next report (every half second while the job prints) or heartbeat
    r = client.post(f"/api/jobs/{job_id}/report", json={**report, "log_start": 1}, headers=worker_headers)
    assert r.json() == {"cancel_requested": True}
    reply = client.post(f"/api/workers/{wid}/heartbeat", json={"running_job_ids": [job_id]},
                        headers=worker_headers).json()
    assert reply == {"cancel_job_ids": [job_id]}
    r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,   # what a worker reports for a stopped run
                    json={"worker_id": wid, "attempt": attempt, "exit_code": 0, "failure_class": "cancelled"})
    assert r.json()["state"] == "cancelled" and r.json()["failure_class"] == "cancelled"


def test_a_run_stopped_as_cancelled_without_a_cancel_request_is_requeued_not_cancelled(client, worker_headers,
                                                                                        job_body):
    """Only a user cancels: a worker's stale stop must not end the job for good."""
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)
    r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,
                    json={"worker_id": wid, "attempt": attempt, "exit_code": 0, "failure_class": "cancelled"})
    assert r.json()["state"] == "queued" and r.json()["attempt"] == attempt + 1, r.json()
    assert not r.json()["failure_class"]
    logs = [x["line"] for x in client.get(f"/api/jobs/{job_id}/logs").json()["data"]]
    assert any("no cancel was requested" in line for line in logs), logs


def test_a_run_that_completed_before_its_cancel_took_effect_succeeded(client, worker_headers, job_body):
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)
    assert client.post(f"/api/jobs/{job_id}/cancel").json()["cancel_requested"]
    r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,   # the trainer had written its results
                    json={"worker_id": wid, "attempt": attempt, "exit_code": 0})
    assert r.json()["state"] == "succeeded" and r.json()["failure_class"] is None
    failed = client.post("/api/jobs", json=job_body()).json()["id"]
    job_id, attempt = _run_one(client, worker_headers, wid)
    client.post(f"/api/jobs/{job_id}/cancel")
    r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,   # killed by the stop: cancelled
                    json={"worker_id": wid, "attempt": attempt, "exit_code": -15, "failure_class": "crash"})
    assert job_id == failed and r.json()["state"] == "cancelled"


def _read_sse(client, job_id, *, max_events: int = 500, timeout_s: float = 30, **kw):
    """The events of a stream that must end by itself; a stream that goes on (a replay repeating events, a
    final job with no "end") fails the test after `max_events` events or `timeout_s` instead of hanging it."""
    events = []
    deadline = time.monotonic() + timeout_s

    def last() -> list:
        return [(e.get("id"), e.get("event")) for e in events[-5:]]

    with client.stream("GET", f"/api/jobs/{job_id}/events", **kw) as r:
        assert r.status_code == 200
        current = {}
        for line in r.iter_lines():   # (pings are lines too: a silent stream still comes back here)
            assert time.monotonic() < deadline, f"the stream did not end within {timeout_s} s; last: {last()}"
            if not line:
                if "data" in current:
                    events.append(current)
                    assert len(events) <= max_events, f"the stream did not end after {max_events} events; " \
                                                      f"last: {last()}"
                current = {}
                continue
            key, _, value = line.partition(": ")
            current[key] = value
    return events


def test_sse_replays_after_last_event_id(client, worker_headers, job_body):
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)
    for step in (1, 2, 3):
        client.post(f"/api/jobs/{job_id}/report", headers=worker_headers,
                    json={"worker_id": wid, "attempt": attempt, "log_start": step - 1, "logs": [f"line {step}"],
                          "metrics": [{"step": step, "loss": 1.0 / step}]})
    client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,
                json={"worker_id": wid, "attempt": attempt, "exit_code": 0})
    *everything, end = _read_sse(client, job_id)  # the job is final: the stream ends by itself, saying so
    assert end == {"event": "end", "data": '{"state": "succeeded"}'}
    ids = [int(e["id"]) for e in everything]
    assert ids == list(range(1, len(ids) + 1))
    assert [json.loads(e["data"])["step"] for e in everything if e["event"] == "metric"] == [1, 2, 3]
    assert json.loads(everything[-1]["data"])["state"] == "succeeded"
    for cut in range(len(ids)):
        *rest, end = _read_sse(client, job_id, headers={"Last-Event-ID": str(cut)})
        assert [int(e["id"]) for e in rest] == ids[cut:] and end["event"] == "end"
    *rest, end = _read_sse(client, job_id, params={"last_event_id": 4})
    assert [int(e["id"]) for e in rest] == ids[4:]
    assert client.get("/api/jobs/999/events").status_code == 404


def test_a_last_event_id_header_outside_the_id_range_is_422_naming_the_header(client, job_body):
    job_id = client.post("/api/jobs", json=job_body()).json()["id"]
    client.post(f"/api/jobs/{job_id}/cancel")   # final: a stream of it ends by itself
    for bad in ("-1", str(2**63), "x"):
        r = client.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": bad})
        assert r.status_code == 422, (bad, r.status_code, r.text)
        assert [e["loc"] for e in r.json()["detail"]] == [["header", "Last-Event-ID"]]
    r = client.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": str(2**63 - 1)})  # the largest id
    assert r.status_code == 200 and "id:" not in r.text and "event: end" in r.text


def test_sse_follows_a_live_job(client, worker_headers, job_body):
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, attempt = _run_one(client, worker_headers, wid)

    def produce() -> None:
        for step in (1, 2):
            time.sleep(0.2)
            client.post(f"/api/jobs/{job_id}/report", headers=worker_headers,
                        json={"worker_id": wid, "attempt": attempt, "metrics": [{"step": step, "loss": 1.0}]})
        client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,
                    json={"worker_id": wid, "attempt": attempt, "exit_code": 0})

    producer = threading.Thread(target=produce)
    producer.start()
    *events, end = _read_sse(client, job_id)
    assert end["event"] == "end"
    producer.join()
    assert [json.loads(e["data"])["step"] for e in events if e["event"] == "metric"] == [1, 2]
    assert events[-1]["event"] == "state" and json.loads(events[-1]["data"])["state"] == "succeeded"


def test_a_restarted_server_gives_workers_a_ttl_to_come_back(settings, worker_headers, client, job_body):
    client.post("/api/jobs", json=job_body())
    wid = _register(client, worker_headers)
    job_id, _ = _run_one(client, worker_headers, wid)
    client.__exit__(None, None, None)  # "kill" the server
    time.sleep(settings.lease_ttl_s + 0.3)  # down for longer than a lease
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings)) as again:
        again.headers["Authorization"] = worker_headers["Authorization"]
        assert reap_once(again.app.state.engine, settings) == []  # leases were extended at start
        reply = again.post(f"/api/workers/{wid}/heartbeat", json={"running_job_ids": [job_id]})
        assert reply.json() == {"cancel_job_ids": []}
        again.headers["Authorization"] = f"Bearer {again.app.state.tokens.user}"
        assert again.get(f"/api/jobs/{job_id}").json()["state"] == "running"


def test_a_job_no_online_worker_can_take_says_so_in_its_log(client, worker_headers, job_body):
    """It waits (a worker may come), but not silently: gpus left at 1 on a CPU-only cluster is the usual slip."""
    def server_lines(job_id):
        return [x["line"] for x in client.get(f"/api/jobs/{job_id}/logs").json()["data"]]

    _register(client, worker_headers, name="cpu-box")
    gpu_job = client.post("/api/jobs", json={**job_body(), "gpus": 1}).json()
    assert server_lines(gpu_job["id"]) == ["[paratrain] queued: it needs 1 GPU(s), and 1 worker(s) online with at "
                                           "most 0 GPU(s): it waits for such a worker; a CPU job is submitted with "
                                           "gpus 0"]
    gang = client.post("/api/jobs", json={**job_body(), "nodes": 2}).json()
    assert "it needs a CPU slot on each of 2 workers" in server_lines(gang["id"])[0]
    _register(client, worker_headers, name="gpu-box", gpus=[0])
    assert server_lines(client.post("/api/jobs", json={**job_body(), "gpus": 1}).json()["id"]) == []
    assert server_lines(client.post("/api/jobs", json=job_body()).json()["id"]) == []


def test_a_retry_after_hand_backs_stays_within_the_submit_bound(client, worker_headers, job_body):
    """Hand-backs grow max_attempts past what a submit may ask for (100): a retry must not be a 500."""
    wid = _register(client, worker_headers)
    client.post("/api/jobs", json={**job_body(), "max_attempts": 100})
    job_id, attempt = _run_one(client, worker_headers, wid)
    back = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers,
                       json={"worker_id": wid, "attempt": attempt, "exit_code": 0, "release": True}).json()
    assert back["max_attempts"] == 101
    client.post(f"/api/jobs/{job_id}/cancel")
    retry = client.post(f"/api/jobs/{job_id}/retry")
    assert retry.status_code == 201, retry.text
    assert retry.json()["max_attempts"] == 100


def test_a_requeued_job_resumes_its_checkpoint_even_if_submitted_with_resume_false(client, worker_headers, job_body):
    """In a job, output_dir is the server's and new, so the only checkpoints resume=False would delete are the
    job's own: a hand-back or a lost lease must resume them, as the server's log and the worker say."""
    job = client.post("/api/jobs", json=job_body(resume=False)).json()
    wid = client.post("/api/workers/register", json={"name": "w"}, headers=worker_headers).json()["worker_id"]
    assert client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).json()["job"]["id"] == job["id"]
    client.post(f"/api/jobs/{job['id']}/finish", headers=worker_headers,
                json={"worker_id": wid, "attempt": 1, "exit_code": 0, "failure_class": "lost",
                      "failure_reason": "handed back"})
    second = client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).json()
    assert second["job"]["attempt"] == 2
    assert "--no-resume" not in second["argv"]                   # the server's command
    assert TrainConfig(**second["job"]["config"]).resume          # what the worker derives its own argv from


def test_sqlite_writers_take_turns_and_every_way_out_of_a_transaction_ends_its_turn(tmp_path):
    """Writers of one process queue on a lock before SQLite's (whose busy handler retries with sleeps, in no
    order). A turn that a failed, read-only or rolled-back transaction kept would stop every later write."""
    from sqlalchemy import text
    from sqlmodel import Session

    from server.db import init_db, make_engine, write_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'turns.db'}")
    init_db(engine)
    writes = write_engine(engine)

    def ways_out() -> None:
        try:
            with Session(writes) as session:
                session.exec(text("SELECT 1"))
                raise RuntimeError("the route failed")
        except RuntimeError:
            pass
        with Session(writes) as session:   # read only, closed without a commit
            session.exec(text("SELECT 1"))
        with Session(writes) as session:
            session.exec(text("SELECT 1"))
            session.rollback()

    first = threading.Thread(target=ways_out, daemon=True)   # a kept turn blocks: fail, do not hang
    first.start()
    first.join(10)
    assert not first.is_alive(), "a transaction that ended without a commit kept the writers' turn"
    order: list[int] = []

    def write(i: int) -> None:
        with Session(writes) as session:
            session.exec(text("CREATE TABLE IF NOT EXISTS t (i INTEGER)"))
            session.exec(text("INSERT INTO t VALUES (:i)"), params={"i": i})
            time.sleep(0.01)
            session.commit()
            order.append(i)

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(order) == list(range(20)), "a writer never got its turn"
    with Session(engine) as session:
        assert session.exec(text("SELECT COUNT(*) FROM t")).one()[0] == 20


def test_a_hand_back_crossed_by_a_cancel_ends_cancelled_not_succeeded(client, worker_headers, job_body):
    """The worker stops (its trainer saves mid-run and exits 0) while the user cancels: not a success."""
    job_id = client.post("/api/jobs", json=job_body()).json()["id"]
    wid = _register(client, worker_headers)
    _, attempt = _run_one(client, worker_headers, wid)
    client.post(f"/api/jobs/{job_id}/cancel")
    r = client.post(f"/api/jobs/{job_id}/finish", headers=worker_headers, json={
        "worker_id": wid, "attempt": attempt, "exit_code": 0, "release": True, "failure_reason": "worker stopping"})
    assert r.json()["state"] == "cancelled", r.json()


def test_a_stopping_worker_is_handed_nothing(client, worker_headers, job_body):
    """A claim sent just before the worker's stop signal, answered after its stopping heartbeat."""
    wid = _register(client, worker_headers)
    client.post(f"/api/workers/{wid}/heartbeat", json={"running_job_ids": [], "stopping": True},
                headers=worker_headers)
    job_id = client.post("/api/jobs", json=job_body()).json()["id"]
    assert client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).status_code == 204
    assert client.get(f"/api/jobs/{job_id}").json()["state"] == "queued"
