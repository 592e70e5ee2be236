"""Multi-node jobs: reservations, gang start, per-node leases, finish rules, logs per node, stale reservations."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from server.main import create_app


class Box:
    """A worker as the server sees it: registers, heartbeats, claims (offering a rendezvous address/port)."""

    def __init__(self, client: TestClient, headers: dict[str, str], name: str, port: int,
                 gpus: tuple[int, ...] = ()) -> None:
        self.client, self.headers, self.name, self.port = client, headers, name, port
        r = client.post("/api/workers/register", json={"name": name, "gpus": [{"index": i} for i in gpus]},
                        headers=headers)
        self.id = r.json()["worker_id"]

    def claim(self, *, accept_cpu_jobs: bool = True, free_gpus: tuple[int, ...] = ()):
        r = self.client.post(f"/api/workers/{self.id}/claim", headers=self.headers, json={
            "accept_cpu_jobs": accept_cpu_jobs, "rdzv_address": f"{self.name}.lan", "rdzv_port": self.port,
            "free_gpu_indices": list(free_gpus)})
        assert r.status_code in (200, 204), r.text
        return r.json() if r.status_code == 200 else None

    def heartbeat(self, *job_ids: int, stopping: bool = False) -> list[int]:
        r = self.client.post(f"/api/workers/{self.id}/heartbeat", headers=self.headers,
                             json={"running_job_ids": list(job_ids), "stopping": stopping})
        return r.json()["cancel_job_ids"]

    def finish(self, job_id: int, attempt: int, exit_code: int = 0, **extra):
        return self.client.post(f"/api/jobs/{job_id}/finish", headers=self.headers, json={
            "worker_id": self.id, "attempt": attempt, "exit_code": exit_code, **extra})

    def report(self, job_id: int, attempt: int, logs: list[str], log_start: int = 0):
        return self.client.post(f"/api/jobs/{job_id}/report", headers=self.headers, json={
            "worker_id": self.id, "attempt": attempt, "logs": logs, "log_start": log_start})


def _gang_job(client, job_body, nodes: int = 2) -> dict:
    r = client.post("/api/jobs", json={**job_body(), "nodes": nodes})
    assert r.status_code == 201, r.text
    return r.json()


def _lines(client, job_id: int) -> list[str]:
    return [x["line"] for x in client.get(f"/api/jobs/{job_id}/logs").json()["data"]]


def _integrity(client) -> list[str]:
    return client.get("/api/integrity").json()["problems"]


def _start_gang(client, worker_headers, job_body):
    job = _gang_job(client, job_body)
    a, b = Box(client, worker_headers, "a", 29001), Box(client, worker_headers, "b", 29002)
    assert a.claim() is None  # reserved node 0, waiting for one more worker
    assert b.claim() is not None
    assert a.claim() is not None
    return job, a, b


def test_a_two_node_job_starts_when_two_workers_hold_a_node(client, worker_headers, job_body):
    job = _gang_job(client, job_body)
    single = client.post("/api/jobs", json=job_body()).json()
    a, b = Box(client, worker_headers, "a", 29001), Box(client, worker_headers, "b", 29002)
    assert a.claim() is None
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "queued"
    assert any("node 0 reserved on worker a" in line for line in _lines(client, job["id"]))
    assert a.claim() is None  # holding a CPU reservation: neither a second node nor the CPU job behind it
    assert _integrity(client) == []

    second = b.claim()  # completes the gang: b starts node 1 at once
    assert second["job"]["id"] == job["id"]
    assert second["rendezvous"] == {"nnodes": 2, "node": 1, "endpoint": "a.lan:29001",
                                    "run_id": f"paratrain-job{job['id']}-attempt1", "local_addr": "b.lan"}
    argv = second["argv"]
    assert "--nnodes=2" in argv and "--rdzv_endpoint=a.lan:29001" in argv and "--rdzv_conf=is_host=0" in argv
    assert "--ddp" in argv and "--standalone" not in argv
    first = a.claim()  # a gets its launch with its next claim
    assert first["job"]["id"] == job["id"] and first["rendezvous"]["node"] == 0
    assert "--rdzv_conf=is_host=1" in first["argv"] and first["rendezvous"]["endpoint"] == "a.lan:29001"
    running = client.get(f"/api/jobs/{job['id']}").json()
    assert running["state"] == "running" and running["worker_id"] == a.id
    assert any("started on 2 workers: node 0 on a, node 1 on b" in line for line in _lines(client, job["id"]))
    workers = {w["name"]: w["running_job_ids"] for w in client.get("/api/workers").json()["data"]}
    assert workers == {"a": [job["id"]], "b": [job["id"]]}
    assert a.claim(accept_cpu_jobs=False) is None  # the CPU job still waits for a free slot
    assert client.get(f"/api/jobs/{single['id']}").json()["state"] == "queued"
    assert _integrity(client) == []


def test_with_one_worker_online_a_gang_job_waits_and_later_jobs_run(client, worker_headers, job_body):
    gang = _gang_job(client, job_body)
    single = client.post("/api/jobs", json=job_body()).json()
    a = Box(client, worker_headers, "a", 29001)
    assert a.claim()["job"]["id"] == single["id"]
    assert client.get(f"/api/jobs/{gang['id']}").json()["state"] == "queued"
    # a worker that offers no rendezvous address takes no multi-node jobs
    b = Box(client, worker_headers, "b", 29002)
    r = client.post(f"/api/workers/{b.id}/claim", json={}, headers=worker_headers)
    assert r.status_code == 204
    [hint] = _lines(client, gang["id"])     # submitted with no worker online; nothing reserved since
    assert "it needs a CPU slot on each of 2 workers, and no worker is online" in hint


def test_gpus_reserved_for_a_forming_gang_are_not_handed_to_a_single_node_job(client, worker_headers, job_body):
    """The worker still reports a reserved GPU as free (nothing runs on it yet): the server must not book it
    twice, or the gang's node and the single-node job would start on the same GPU."""
    gang = client.post("/api/jobs", json={**job_body(), "gpus": 1, "nodes": 2}).json()
    a = Box(client, worker_headers, "a", 29001, gpus=(0, 1))
    b = Box(client, worker_headers, "b", 29002, gpus=(0, 1))
    assert a.claim(free_gpus=(0, 1)) is None
    assert any("node 0 reserved on worker a GPUs [0]" in line for line in _lines(client, gang["id"]))
    two = client.post("/api/jobs", json={**job_body(), "gpus": 2}).json()
    assert a.claim(free_gpus=(0, 1)) is None  # one GPU is left on a: a two-GPU job does not fit
    one = client.post("/api/jobs", json={**job_body(), "gpus": 1}).json()
    launch = a.claim(free_gpus=(0, 1))
    assert launch["job"]["id"] == one["id"] and launch["gpu_ids"] == [1]
    assert client.get(f"/api/jobs/{two['id']}").json()["state"] == "queued"
    # the gang still starts on the GPU it reserved
    assert b.claim(free_gpus=(0, 1))["job"]["id"] == gang["id"]
    node0 = a.claim(free_gpus=(0,))
    assert node0["job"]["id"] == gang["id"] and node0["gpu_ids"] == [0]
    assert _integrity(client) == []


def test_the_job_succeeds_only_when_every_node_has(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)
    assert b.finish(job["id"], 1).json()["state"] == "running"
    assert any("node 1 finished; waiting for 1 more node" in line for line in _lines(client, job["id"]))
    for _ in range(15):  # past the 2 s TTL: only node 0's worker still heartbeats, and that is enough now
        assert a.heartbeat(job["id"]) == []
        time.sleep(0.2)
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
    assert a.finish(job["id"], 1).json()["state"] == "succeeded"
    assert _integrity(client) == []


def test_a_silent_node_requeues_the_whole_gang(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)
    deadline = time.time() + 10
    while client.get(f"/api/jobs/{job['id']}").json()["state"] != "queued":
        assert time.time() < deadline
        assert a.heartbeat(job["id"]) in ([], [job["id"]])
        time.sleep(0.2)
    again = client.get(f"/api/jobs/{job['id']}").json()
    assert again["attempt"] == 2 and again["worker_id"] is None
    assert any("worker b (node 1) stopped heartbeating" in line for line in _lines(client, job["id"]))
    assert a.heartbeat(job["id"]) == [job["id"]]  # node 0 learns the job is no longer its own
    assert a.finish(job["id"], 1).status_code == 409
    assert _integrity(client) == []
    # attempt 2 forms a fresh gang, with a new rendezvous id, once b is back online
    assert a.claim() is None  # only a is online: it reserves nothing
    assert _lines(client, job["id"])[-1].startswith("[paratrain] worker b (node 1) stopped heartbeating")
    b.heartbeat()
    assert a.claim() is None
    launch = b.claim()
    assert launch["rendezvous"]["run_id"] == f"paratrain-job{job['id']}-attempt2"


def test_a_node_with_bad_data_fails_the_job_and_stops_the_others(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)
    failed = b.finish(job["id"], 1, exit_code=2, failure_class="data", failure_reason="demo.jsonl:3: bad").json()
    assert failed["state"] == "failed" and failed["failure_reason"] == "node 1 (worker b): demo.jsonl:3: bad"
    assert a.heartbeat(job["id"]) == [job["id"]]
    assert a.finish(job["id"], 1).status_code == 409
    assert _integrity(client) == []


def test_a_crashed_node_requeues_the_gang_until_attempts_run_out(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)  # max_attempts 2 (settings)
    again = a.finish(job["id"], 1, exit_code=1, failure_class="crash", failure_reason="exit code 1\ngloo: peer gone")
    assert again.json()["state"] == "queued" and again.json()["attempt"] == 2
    assert any("node 0 (worker a) crashed (exit code 1); re-queued" in line for line in _lines(client, job["id"]))
    assert b.heartbeat(job["id"]) == [job["id"]]
    assert a.claim() is None and b.claim() is not None and a.claim() is not None
    failed = b.finish(job["id"], 2, exit_code=1, failure_class="crash", failure_reason="exit code 1").json()
    assert failed["state"] == "failed" and failed["failure_class"] == "lost"
    assert "node 1 (worker b) crashed (exit code 1); gave up after 2 attempts" in failed["failure_reason"]
    assert _integrity(client) == []


def test_a_stopping_node_hands_the_whole_gang_back(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)
    back = a.finish(job["id"], 1, release=True).json()
    assert back["state"] == "queued" and back["attempt"] == 2
    assert b.heartbeat(job["id"]) == [job["id"]]
    assert _integrity(client) == []


def test_cancel_reaches_every_node(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)
    client.post(f"/api/jobs/{job['id']}/cancel")
    assert a.heartbeat(job["id"]) == [job["id"]] and b.heartbeat(job["id"]) == [job["id"]]
    assert b.finish(job["id"], 1, failure_class="cancelled").json()["state"] == "cancelled"   # as a stopped run reports
    # cancelling a gang still forming gives its reservations back
    forming = _gang_job(client, job_body)
    assert a.claim() is None
    assert client.post(f"/api/jobs/{forming['id']}/cancel").json()["state"] == "cancelled"
    assert _integrity(client) == []


def test_each_nodes_log_lines_are_kept_apart(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)
    for _ in range(2):  # the second send is a retry: stored once
        assert a.report(job["id"], 1, ["loss 1"]).json() == {"cancel_requested": False}
        assert b.report(job["id"], 1, ["gloo ready"]).json() == {"cancel_requested": False}
    b.report(job["id"], 1, ["gloo ready", "done"])
    worker_lines = [line for line in _lines(client, job["id"]) if not line.startswith("[paratrain]")]
    assert worker_lines == ["[node 0] loss 1", "[node 1] gloo ready", "[node 1] done"]
    stranger = Box(client, worker_headers, "c", 29003)
    assert stranger.report(job["id"], 1, ["x"]).status_code == 409


@pytest.fixture
def quick_gang_client(settings):
    settings = settings.model_copy(update={"gang_wait_s": 0.5})
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {c.app.state.tokens.user}"
        yield c


def test_a_gang_that_does_not_form_gives_its_reservations_back(quick_gang_client, job_body):
    client = quick_gang_client
    headers = {"Authorization": f"Bearer {client.app.state.tokens.worker}"}
    job = _gang_job(client, job_body)
    a = Box(client, headers, "a", 29001)
    Box(client, headers, "b", 29002)  # online, but never claims
    assert a.claim() is None
    deadline = time.time() + 10
    while not any("reservations released" in line for line in _lines(client, job["id"])):
        assert time.time() < deadline
        a.heartbeat()
        time.sleep(0.1)
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "queued"
    assert _integrity(client) == []
    # a worker that registers again (a restart) also drops what it had reserved
    assert a.claim() is None
    Box(client, headers, "a", 29001)
    assert sum("reservations released" in line for line in _lines(client, job["id"])) >= 2
    assert _integrity(client) == []


def test_nodes_is_validated(client, job_body):
    r = client.post("/api/jobs", json={**job_body(), "nodes": 65})
    assert r.status_code == 422 and "nodes" in r.text
    assert client.post("/api/jobs", json={**job_body(), "nodes": 0}).status_code == 422


def test_commands_show_the_multi_node_launch(client, worker_headers, job_body):
    preview = client.post("/api/command-preview", json={**job_body(), "nodes": 3}).json()["argv"]
    assert "--nnodes=3" in preview and "--rdzv_endpoint=<node 0 address>:<port>" in preview
    job, a, b = _start_gang(client, worker_headers, job_body)
    argv = client.get(f"/api/jobs/{job['id']}/command").json()["argv"]
    assert "--rdzv_endpoint=a.lan:29001" in argv and "--rdzv_conf=is_host=1" in argv


def test_a_stopping_worker_gives_back_what_it_holds_for_a_gang(client, worker_headers, job_body):
    job = _gang_job(client, job_body)
    a, b = Box(client, worker_headers, "a", 29001), Box(client, worker_headers, "b", 29002)
    assert a.claim() is None
    a.heartbeat(stopping=True)  # warm stop: it would never start its node
    assert any("reservations released (worker a is stopping)" in line for line in _lines(client, job["id"]))
    # the gang formed, but the stopping worker had not started its node yet: the job goes back to the queue
    assert b.claim() is None
    assert a.claim() is None   # a stopping worker is handed nothing
    a = Box(client, worker_headers, "a", 29001)   # a, restarted, completes the gang as node 1
    assert a.claim() is not None
    b.heartbeat(stopping=True)
    again = client.get(f"/api/jobs/{job['id']}").json()
    assert again["state"] == "queued" and again["attempt"] == 2
    assert any("worker b stopped before starting node 0" in line for line in _lines(client, job["id"]))
    assert _integrity(client) == []


def test_a_claim_counts_its_own_worker_as_online(client, worker_headers, job_body):
    a = Box(client, worker_headers, "a", 29001)
    time.sleep(2.3)  # longer than the TTL without a heartbeat: the claim itself is proof of life
    single = client.post("/api/jobs", json=job_body()).json()
    assert a.claim()["job"]["id"] == single["id"]


def test_racing_workers_form_each_gang_exactly_once(settings, job_body):
    """Six workers claim at once, each with its own connections (like six server processes), on SQLite and
    PostgreSQL: every two-node job starts on two distinct workers, no worker gets two launches."""
    import threading

    from sqlmodel import Session

    from server import queue
    from server.models import ClaimRequest
    from tests.server.conftest import race_workers

    app = create_app(settings)  # no lifespan, so no reaper: slow threads must not see leases expire
    with TestClient(app) as setup:
        setup.headers["Authorization"] = f"Bearer {app.state.tokens.user}"
        job_ids = [_gang_job(setup, job_body)["id"] for _ in range(3)]
    launches: list[tuple[int, int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def claim_one_launch(engine, worker_id: int, name: str) -> None:
        start.wait()
        request = ClaimRequest(rdzv_address=f"{name}.lan", rdzv_port=29000)
        for _ in range(40):
            with Session(engine) as session:
                me = queue.get_worker(session=session, worker_id=worker_id)
                launch = queue.claim_job(session=session, worker=me, request=request, settings=settings)
                got = (launch.job.id, launch.rendezvous.node, name) if launch else None
                session.commit()
            if got:
                with lock:
                    launches.append(got)
                return  # its one CPU slot is busy now
            time.sleep(0.02)

    race_workers(settings, 6, claim_one_launch)
    assert sorted(job for job, _, _ in launches) == sorted(job_ids * 2), launches
    for job_id in job_ids:
        mine = [(node, name) for job, node, name in launches if job == job_id]
        assert sorted(node for node, _ in mine) == [0, 1] and len({name for _, name in mine}) == 2
    assert len({name for _, _, name in launches}) == 6
    with TestClient(create_app(settings)) as check:
        check.headers["Authorization"] = f"Bearer {check.app.state.tokens.user}"
        assert _integrity(check) == []


@pytest.mark.parametrize("goes_away", ["leaves", "restarts"])
def test_a_node_that_finished_may_go_away_while_the_others_finish(client, worker_headers, job_body, goes_away):
    """Rank 0 finishes last (it writes the final outputs): a warm-stopped worker whose node is done leaves
    (or restarts) before that, and the gang's success must stand, not be re-run or failed as lost."""
    job, a, b = _start_gang(client, worker_headers, job_body)
    assert b.finish(job["id"], 1).json()["state"] == "running"
    if goes_away == "leaves":
        assert client.post(f"/api/workers/{b.id}/leave", headers=worker_headers, json={}).status_code == 204
    else:
        Box(client, worker_headers, "b", 29002)
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
    done = a.finish(job["id"], 1)
    assert done.status_code == 200 and done.json()["state"] == "succeeded" and done.json()["attempt"] == 1
    assert _integrity(client) == []


def test_a_launch_claimed_late_gets_a_lease_from_its_launch(client, worker_headers, job_body, settings):
    """A node's lease counts from when its worker took the launch, not from when the gang completed: a
    worker slow to claim (a long final-report flush) must not lose the gang before its first heartbeat."""
    ttl = settings.lease_ttl_s
    job = _gang_job(client, job_body)
    a, b = Box(client, worker_headers, "a", 29001), Box(client, worker_headers, "b", 29002)
    assert a.claim() is None and b.claim() is not None   # the gang is complete; a has not taken its launch
    complete = time.monotonic()
    # half a TTL late: a second left for b's heartbeat and a's claim on a busy CI box (0.75 of it, 0.5 s, once
    # was not)
    time.sleep(0.5 * ttl)
    b.heartbeat(job["id"])
    assert a.claim() is not None
    time.sleep(max(0.0, complete + 1.3 * ttl - time.monotonic()))   # past the gang start's TTL, within the launch's
    b.heartbeat(job["id"])   # b stays alive: a's lease, from its launch, is the one under test
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "running", _lines(client, job["id"])


@pytest.mark.parametrize("order", ["peer first", "release first"])
def test_a_gang_handed_back_by_one_stopping_worker_uses_up_no_attempt(client, worker_headers, job_body, order):
    """b is stopped (cold): it tells the server, then stops its trainers; the gang stops together, and a's
    trainer exits 0 mid-run ("lost": a signal a's worker did not send). Whichever finish comes first, the
    gang is handed back, and the hand-back costs no attempt."""
    job, a, b = _start_gang(client, worker_headers, job_body)
    max_attempts = client.get(f"/api/jobs/{job['id']}").json()["max_attempts"]
    b.heartbeat(job["id"], stopping=True)
    finishes = [lambda: a.finish(job["id"], 1, failure_class="lost", failure_reason="stopped by a signal"),
                lambda: b.finish(job["id"], 1, release=True)]
    first, second = finishes if order == "peer first" else finishes[::-1]
    back = first().json()
    assert back["state"] == "queued" and back["attempt"] == 2 and back["max_attempts"] == max_attempts + 1, back
    assert second().status_code == 409
    assert _integrity(client) == []


def test_a_gang_node_lost_without_a_stopping_peer_uses_up_an_attempt(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)
    max_attempts = client.get(f"/api/jobs/{job['id']}").json()["max_attempts"]
    back = a.finish(job["id"], 1, failure_class="lost", failure_reason="stopped by a signal").json()
    assert back["state"] == "queued" and back["attempt"] == 2 and back["max_attempts"] == max_attempts


def test_a_gang_nodes_launch_whose_answer_was_lost_is_offered_again(client, worker_headers, job_body):
    job, a, b = _start_gang(client, worker_headers, job_body)   # a took node 0's launch; say its answer was lost
    r = client.post(f"/api/workers/{a.id}/claim", headers=worker_headers, json={
        "rdzv_address": "a.lan", "rdzv_port": 29001, "busy_job_ids": []})
    assert r.status_code == 200 and r.json()["rendezvous"]["node"] == 0 and r.json()["job"]["attempt"] == 1
    r = client.post(f"/api/workers/{a.id}/claim", headers=worker_headers, json={
        "rdzv_address": "a.lan", "rdzv_port": 29001, "busy_job_ids": [job["id"]]})
    assert r.status_code == 204
    assert _integrity(client) == []


def test_a_gang_does_not_start_with_a_reservation_whose_worker_went_silent(settings, job_body):
    """Between two reaper passes: the claim that would complete the gang finds a node's lease run out."""
    client = TestClient(create_app(settings))   # no lifespan, so no reaper: the claim meets the stale node itself
    client.headers["Authorization"] = f"Bearer {client.app.state.tokens.user}"
    worker_headers = {"Authorization": f"Bearer {client.app.state.tokens.worker}"}
    job = _gang_job(client, job_body)
    a, b = Box(client, worker_headers, "a", 29001), Box(client, worker_headers, "b", 29002)
    assert a.claim() is None
    time.sleep(settings.lease_ttl_s + 0.2)   # a says nothing more
    Box(client, worker_headers, "c", 29003)  # another worker online: two are, so the gang can form
    got = b.claim()
    print("GOT", got, _lines(client, job["id"]))
    assert got is None
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "queued"
    assert any("reserving worker went silent" in line for line in _lines(client, job["id"]))
