"""The worker agent against a live server, running the fake trainer (no torch)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest



def wait_for_step(live_server, job_id: int, step: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while live_server.api.get(f"/jobs/{job_id}").json()["step"] < step:
        assert time.time() < deadline, f"job {job_id} did not reach step {step}"
        time.sleep(0.05)


def _pid_files(job: dict) -> list[dict]:
    out = Path(job["config"]["output_dir"])
    return [json.loads(p.read_text()) for p in sorted(out.glob("pids-*.json"))]


def process_gone(pid: int) -> bool:
    """Gone or a zombie nobody reaped yet (it runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while not all(process_gone(p) for p in pids):
        assert time.time() < deadline, [p for p in pids if not process_gone(p)]
        time.sleep(0.05)


def test_job_runs_to_success_with_metrics_and_logs(live_server, start_agent, job_body):
    job = live_server.api.post("/jobs", json=job_body()).json()
    start_agent()
    done = live_server.wait_for(job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    assert done["exit_code"] == 0 and done["step"] == 5 and done["total_steps"] == 5
    metrics = live_server.api.get(f"/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    lines = [x["line"] for x in live_server.api.get(f"/jobs/{job['id']}/logs").json()["data"]]
    assert "step 5/5" in lines and any('"event": "done"' in x for x in lines)
    artifacts = live_server.api.get(f"/jobs/{job['id']}/artifacts").json()["data"]
    assert "final.txt" in [a["path"] for a in artifacts]
    assert live_server.api.get(f"/jobs/{job['id']}/artifacts/final.txt").text == "done\n"
    assert _pid_files(done)[0]["cuda_visible_devices"] == ""  # a CPU job sees no GPU
    retry = live_server.api.post(f"/jobs/{job['id']}/retry")   # nothing to resume after the last step
    assert retry.status_code == 409 and "succeeded" in retry.json()["detail"]


def test_failure_classes(live_server, start_agent, job_body, caplog):
    caplog.set_level(logging.INFO, logger="paratrain.worker")
    caplog.set_level(logging.INFO, logger="paratrain.server")
    ids = {name: live_server.api.post("/jobs", json=job_body(name=name)).json()["id"]
           for name in ("data-error", "oom", "crash")}
    start_agent()
    data = live_server.wait_for(ids["data-error"], {"succeeded", "failed"})
    assert data["failure_class"] == "data" and data["exit_code"] == 2
    assert "data.jsonl:3:" in data["failure_reason"]
    oom = live_server.wait_for(ids["oom"], {"succeeded", "failed"})
    assert oom["failure_class"] == "oom" and oom["exit_code"] == 3
    crash = live_server.wait_for(ids["crash"], {"succeeded", "failed"})
    assert crash["failure_class"] == "crash" and "RuntimeError: boom" in crash["failure_reason"]
    # the worker's log says which attempt ended how, and why
    worker_log = [r.getMessage() for r in caplog.records if r.name == "paratrain.worker"]
    assert any(m.startswith(f"job {ids['data-error']} attempt 1 ended: data, exit 2: ") and "data.jsonl:3:" in m
               for m in worker_log), worker_log
    assert any(m.startswith(f"job {ids['crash']} attempt 1 ended: crash, exit 1: exit code 1 ... RuntimeError: boom")
               for m in worker_log), worker_log
    # and the server's log what happened to each job, committed (its transitions, with the reason)
    server_log = [r.getMessage() for r in caplog.records if r.name == "paratrain.server"]
    assert any(m.startswith(f"job {ids['oom']} (oom): queued, 0 GPU(s) x 1 node(s)") for m in server_log), server_log
    assert f"job {ids['oom']} (oom): attempt 1 started on worker test-worker (CPU)" in server_log, server_log
    assert any(m.startswith(f"job {ids['data-error']} (data-error): running -> failed (data: ") for m in server_log)
    assert any(m.startswith("worker test-worker (id ") and "registered with GPUs none" in m for m in server_log)


def _store_config(live_server, job_id: int, **changes) -> None:
    """Edit a stored config behind the API, as a row an older, looser server wrote would look."""
    from sqlmodel import Session

    from server.models import Job

    with Session(live_server.app.state.write_engine) as session:
        row = session.get(Job, job_id)
        row.config = {**row.config, **changes}
        session.add(row)
        session.commit()


@pytest.mark.parametrize("server_settings", [{"max_body_mb": 0.003}], indirect=True)
def test_a_report_the_server_refuses_is_dropped_and_the_job_still_finishes(live_server, start_agent, job_body,
                                                                            monkeypatch):
    """A 413 (here: a long log line over a 3 KB body limit) used to count as "server unreachable": the same
    batch was re-sent forever, and the job never finished."""
    monkeypatch.setenv("FAKE_STEP_S", "0.3")   # a report per step: only the long line's batch is refused
    job = live_server.api.post("/jobs", json=job_body(name="long-line", max_steps=4)).json()
    start_agent()
    done = live_server.wait_for(job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded" and done["step"] == 4, done
    lines = [x["line"] for x in live_server.api.get(f"/jobs/{job['id']}/logs").json()["data"]]
    assert "step 4/4" in lines and not any(x.startswith("long line") for x in lines)


@pytest.mark.parametrize("refused_by", ["server", "worker"])
def test_a_stored_config_that_is_no_longer_valid_fails_that_job_only(live_server, start_agent, job_body,
                                                                      monkeypatch, refused_by):
    """After an upgrade tightens the schema, such a job fails with the field named; the queue goes on."""
    bad = live_server.api.post("/jobs", json=job_body()).json()
    good = live_server.api.post("/jobs", json=job_body()).json()
    _store_config(live_server, bad["id"], learning_rate=-1.0)
    if refused_by == "worker":   # a server older than its worker hands the config out unchecked
        from server import queue
        from trainer_core.config import TrainConfig

        monkeypatch.setattr(queue, "stored_config", lambda job: TrainConfig.model_construct(**job.config))
    agent = start_agent()
    failed = live_server.wait_for(bad["id"], {"succeeded", "failed"})
    assert failed["state"] == "failed" and failed["failure_class"] == "data", failed
    assert "learning_rate" in failed["failure_reason"] and failed["attempt"] == 1
    assert live_server.wait_for(good["id"], {"succeeded", "failed"})["state"] == "succeeded"
    assert agent.thread.is_alive() and agent.exit_code is None


@pytest.mark.parametrize("newer_value", [None, 3])
def test_a_worker_older_than_its_server_runs_jobs_that_leave_newer_fields_at_their_default(
        live_server, start_agent, job_body, monkeypatch, newer_value):
    """A rolling upgrade: the server's schema has a field this worker's lacks. A job that leaves it at the
    server's default runs here; one that sets it fails with the field named and the fix."""
    from server import queue
    from server.routes import workers
    from trainer_core.config import TrainConfig, fields_at_default

    job = live_server.api.post("/jobs", json=job_body(max_steps=2)).json()
    _store_config(live_server, job["id"], newer_feature=newer_value)
    # the newer server: its schema knows newer_feature, with default None
    monkeypatch.setattr(queue, "stored_config", lambda job: TrainConfig.model_construct(**job.config))
    monkeypatch.setattr(workers, "fields_at_default", lambda config: fields_at_default(config) + (
        ["newer_feature"] if config.get("newer_feature") is None else []))
    start_agent()
    done = live_server.wait_for(job["id"], {"succeeded", "failed"})
    if newer_value is None:
        assert done["state"] == "succeeded", done
    else:
        assert done["state"] == "failed" and done["failure_class"] == "data", done
        assert done["failure_reason"] == ("this worker's paratrain does not know the config field(s) newer_feature, "
                                          "which this job sets: upgrade the worker to the server's version")


def test_a_job_stored_with_resume_off_before_the_server_forced_it_still_resumes(live_server, start_agent,
                                                                                job_body):
    """resume=false in a job only ever deleted its own earlier attempts' checkpoints. New jobs are stored
    with resume on; one stored before that must not get --no-resume from the worker, which derives the
    command from the stored config."""
    job = live_server.api.post("/jobs", json=job_body()).json()
    _store_config(live_server, job["id"], resume=False)
    start_agent()
    assert live_server.wait_for(job["id"], {"succeeded", "failed"})["state"] == "succeeded"
    [started] = _pid_files(job)
    assert "--no-resume" not in started["argv"], started["argv"]


def test_a_claim_this_worker_cannot_read_fails_that_job_with_the_reason(live_server, start_agent, job_body,
                                                                        monkeypatch):
    """A server of another version hands out a job in a reply this worker cannot parse. The job is leased to
    the worker by then: dropped, it would lapse, come back and be dropped again until its attempts ran out,
    ending `lost` with no word of why."""
    import worker.client
    from server.models import Claim

    class NewerClaim(Claim):   # what an older server's reply lacks
        field_of_a_newer_server: int

    monkeypatch.setattr(worker.client, "Claim", NewerClaim)
    job = live_server.api.post("/jobs", json=job_body()).json()
    agent = start_agent()
    failed = live_server.wait_for(job["id"], {"succeeded", "failed"})
    assert failed["state"] == "failed" and failed["failure_class"] == "data" and failed["attempt"] == 1, failed
    assert "cannot read the server's claim" in failed["failure_reason"]
    assert "field_of_a_newer_server" in failed["failure_reason"]
    assert agent.thread.is_alive() and agent.exit_code is None


def test_cancel_kills_the_whole_process_group(live_server, start_agent, monkeypatch, job_body):
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    job = live_server.api.post("/jobs", json=job_body(max_steps=100)).json()
    start_agent()
    live_server.wait_for(job["id"], {"running"})
    deadline = time.time() + 10
    while not _pid_files(job) or live_server.api.get(f"/jobs/{job['id']}").json()["step"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    pids = [p for info in _pid_files(job) for p in (info["pid"], info["child"])]
    live_server.api.post(f"/jobs/{job['id']}/cancel")
    done = live_server.wait_for(job["id"], {"cancelled", "failed", "succeeded"})
    assert done["state"] == "cancelled" and done["failure_class"] == "cancelled"
    wait_gone(pids, timeout=2)


def test_a_cancel_that_arrives_after_the_last_step_leaves_the_job_succeeded(live_server, start_agent, monkeypatch,
                                                                              job_body):
    """The final weights are written when the trainer prints "done": a cancel racing its exit undoes nothing."""
    monkeypatch.setenv("FAKE_DONE_LINGER_S", "2")
    job = live_server.api.post("/jobs", json=job_body(max_steps=3)).json()
    start_agent()
    deadline = time.time() + 20
    while not any('"event": "done"' in x["line"] for x in
                  live_server.api.get(f"/jobs/{job['id']}/logs").json()["data"]):
        assert time.time() < deadline
        time.sleep(0.05)
    assert live_server.api.post(f"/jobs/{job['id']}/cancel").status_code == 200
    done = live_server.wait_for(job["id"], {"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded" and done["exit_code"] == 0, done


def test_a_trainer_ignoring_sigterm_is_killed_after_the_grace(live_server, start_agent, job_body):
    job = live_server.api.post("/jobs", json=job_body(name="stubborn", max_steps=1)).json()
    start_agent(kill_grace_s=1.0)
    wait_for_step(live_server, job["id"], 1)
    pids = [p for info in _pid_files(job) for p in (info["pid"], info["child"])]
    t0 = time.time()
    live_server.api.post(f"/jobs/{job['id']}/cancel")
    done = live_server.wait_for(job["id"], {"cancelled"})
    assert done["exit_code"] == -9 and time.time() - t0 >= 1.0
    wait_gone(pids, timeout=2)


def test_jobs_share_a_worker_on_disjoint_gpus(live_server, start_agent, monkeypatch, job_body):
    monkeypatch.setenv("FAKE_STEP_S", "0.3")
    ids = [live_server.api.post("/jobs", json=job_body(gpus=g, max_steps=8)).json()["id"] for g in (1, 2, 1)]
    start_agent(gpus="0,1,2")
    # jobs 1 and 2 (1 + 2 GPUs) run together; job 3 waits for a GPU
    first, second = (live_server.wait_for(i, {"running"}) for i in ids[:2])
    assert sorted(first["gpu_ids"] + second["gpu_ids"]) == [0, 1, 2]
    assert live_server.api.get(f"/jobs/{ids[2]}").json()["state"] == "queued"
    for job_id in ids:
        assert live_server.wait_for(job_id, {"succeeded", "failed"})["state"] == "succeeded"
    seen = [_pid_files(live_server.api.get(f"/jobs/{i}").json())[0]["cuda_visible_devices"] for i in ids[:2]]
    assert sorted(",".join(seen).split(",")) == ["0", "1", "2"]


def test_max_cpu_jobs_1_runs_cpu_jobs_one_after_the_other(live_server, start_agent, monkeypatch, job_body):
    """Two CPU trainings at once would share the cores (and RAM) the limit was set for: the second waits."""
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    first, second = (live_server.api.post("/jobs", json=job_body(max_steps=5)).json()["id"] for _ in range(2))
    start_agent(max_cpu_jobs=1)
    wait_for_step(live_server, first, 1)
    assert live_server.api.get(f"/jobs/{second}").json()["state"] == "queued"
    done = [live_server.wait_for(i, {"succeeded", "failed"}) for i in (first, second)]
    assert [d["state"] for d in done] == ["succeeded", "succeeded"], done
    started, finished = (datetime.fromisoformat(d[k]) for d, k in ((done[1], "started_at"), (done[0], "finished_at")))
    assert started >= finished, done   # never both at once


def test_cold_stop_hands_jobs_back_and_they_resume(live_server, start_agent, monkeypatch, job_body):
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    # long enough (4 s after step 3) that a busy CI machine cannot finish it before the stop reaches it
    job = live_server.api.post("/jobs", json=job_body(max_steps=24)).json()
    agent = start_agent()
    wait_for_step(live_server, job["id"], 3)
    agent.stop(cold=True)
    back = live_server.api.get(f"/jobs/{job['id']}").json()
    assert back["state"] == "queued" and back["attempt"] == 2
    [worker] = live_server.api.get("/workers").json()["data"]
    assert worker["online"] is False and worker["left_at"]     # said goodbye: offline now, not after a TTL
    start_agent()
    done = live_server.wait_for(job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded"
    metrics = live_server.api.get(f"/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, 25))
    lines = [x["line"] for x in live_server.api.get(f"/jobs/{job['id']}/logs").json()["data"]]
    starts = [x for x in lines if '"start"' in x]
    assert json.loads(starts[-1])["resumed_from_step"] >= 3  # the second run continued from its checkpoint


@pytest.mark.parametrize("stop_mode, cold_after_one_signal", [("warm", False), ("cold", True)])
def test_the_first_stop_signal_is_cold_in_cold_stop_mode(stop_mode, cold_after_one_signal):
    """Containers get one SIGTERM, then SIGKILL: there the first signal must hand the jobs back."""
    import signal

    from worker.agent import Agent
    from worker.settings import WorkerSettings

    agent = Agent(WorkerSettings(token="t", stop_mode=stop_mode), client=None, gpus=[])
    agent._on_signal(signal.SIGTERM, None)
    assert agent.warm_stop.is_set() and agent.cold_stop.is_set() == cold_after_one_signal
    agent._on_signal(signal.SIGTERM, None)
    assert agent.cold_stop.is_set()


def test_a_warm_stop_shows_the_worker_stopping_until_its_job_ends(live_server, start_agent, monkeypatch,
                                                                  job_body):
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    job = live_server.api.post("/jobs", json=job_body(max_steps=10)).json()
    agent = start_agent()
    deadline = time.time() + 10
    while live_server.api.get(f"/jobs/{job['id']}").json()["step"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    [worker] = live_server.api.get("/workers").json()["data"]
    assert worker["online"] and not worker["stopping"]
    agent.agent.warm_stop.set()        # the first SIGTERM: no new jobs, the running one finishes
    while not live_server.api.get("/workers").json()["data"][0]["stopping"]:
        assert time.time() < deadline, "the warm stop never showed"
        time.sleep(0.05)
    assert live_server.api.get("/workers").json()["data"][0]["online"]
    agent.stop()
    assert live_server.api.get(f"/jobs/{job['id']}").json()["state"] == "succeeded"
    [worker] = live_server.api.get("/workers").json()["data"]
    assert not worker["online"] and not worker["stopping"]   # it has stopped


def test_server_down_mid_job_loses_nothing(live_server, start_agent, monkeypatch, job_body, make_server, caplog):
    caplog.set_level(logging.INFO, logger="paratrain.worker")
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    job = live_server.api.post("/jobs", json=job_body(max_steps=15)).json()
    start_agent()
    wait_for_step(live_server, job["id"], 2)
    live_server.stop()
    time.sleep(live_server.settings.lease_ttl_s + 0.5)  # down for longer than a lease
    again = make_server(live_server.settings)
    done = again.wait_for(job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded" and done["attempt"] == 1  # never re-queued
    metrics = again.api.get(f"/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, 16))
    lines = [x["line"] for x in again.api.get(f"/jobs/{job['id']}/logs").json()["data"]]
    assert [x for x in lines if x.startswith("step ")] == [f"step {i}/15" for i in range(1, 16)]
    # the outage is one warning and one line when it ends, not a line per retry (every 0.1 s here)
    worker_log = [r.getMessage() for r in caplog.records if r.name == "paratrain.worker"]
    assert sum("unreachable" in m for m in worker_log) == 1, worker_log
    assert sum("reachable again" in m for m in worker_log) == 1, worker_log


def _a_job_then_a_server_refusing_the_token(live_server, start_agent, monkeypatch, job_body, make_server, caplog,
                                           max_steps: int):
    """A job training at step 2, then its server restarted with another worker token: (job, agent, server)."""
    caplog.set_level(logging.INFO, logger="paratrain.worker")
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    job = live_server.api.post("/jobs", json=job_body(max_steps=max_steps)).json()
    agent = start_agent()
    wait_for_step(live_server, job["id"], 2)
    live_server.stop()
    return job, agent, make_server(live_server.settings.model_copy(update={"worker_token": "another-token"}))


def test_a_token_refused_mid_job_keeps_the_job_training_until_the_server_takes_it_again(
        live_server, start_agent, monkeypatch, job_body, make_server, caplog):
    """A server restarted with another worker token (rotated, or another server on the URL) refuses the
    running worker's calls. The worker used to exit and kill its trainer at once: every step since the last
    checkpoint was lost. It now says what is wrong and keeps the job training and its reports waiting."""
    job, agent, other = _a_job_then_a_server_refusing_the_token(live_server, start_agent, monkeypatch, job_body,
                                                                 make_server, caplog, max_steps=20)
    time.sleep(1.5)   # several refused heartbeats and reports
    other.stop()
    assert agent.thread.is_alive(), "the worker stopped on a refused token"
    worker_log = [r.getMessage() for r in caplog.records if r.name == "paratrain.worker"]
    refused = [m for m in worker_log if "refused this worker's token" in m]
    assert len(refused) == 1 and "after the lease TTL the server re-queues them: restart this worker" in refused[0]
    again = make_server(live_server.settings)   # the token the worker has
    done = again.wait_for(job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded" and done["attempt"] == 1
    metrics = again.api.get(f"/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, 21))


def test_a_worker_whose_token_is_refused_still_stops_when_told(live_server, start_agent, monkeypatch, job_body,
                                                                make_server, caplog):
    """What it keeps for delivery would wait forever for a server that refuses its token: stopping, it gives
    that up once its jobs have exited, and says so."""
    _, agent, _ = _a_job_then_a_server_refusing_the_token(live_server, start_agent, monkeypatch, job_body,
                                                           make_server, caplog, max_steps=50)
    time.sleep(0.5)
    agent.stop(cold=True, timeout=20)      # two signals: hand the job back, then exit
    assert agent.exit_code == 1
    assert any("stopping without delivering the end of job(s) [1]" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_under_torchrun_the_trainers_exit_code_is_recovered(live_server, start_agent, job_body):
    """torchrun exits 1 whatever its ranks did; the worker reads the root cause's exit code."""
    ids = {name: live_server.api.post("/jobs", json={**job_body(name=name, max_steps=2), "nproc": 2}).json()["id"]
           for name in ("data-error", "ok")}
    start_agent(use_torchrun=True)
    data = live_server.wait_for(ids["data-error"], {"succeeded", "failed"}, timeout=60)
    assert data["failure_class"] == "data" and data["exit_code"] == 2, data   # the rank's, not torchrun's 1
    assert "data.jsonl:3:" in data["failure_reason"] and "Root Cause" not in data["failure_reason"]
    ok = live_server.wait_for(ids["ok"], {"succeeded", "failed"}, timeout=60)
    assert ok["state"] == "succeeded", ok


@pytest.mark.slow
def test_a_cancelled_torchrun_job_ends_cleanly(live_server, start_agent, monkeypatch, job_body):
    """Cancel stops the ranks (they save and exit 0) and torchrun with them: no traceback, exit 0."""
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    job = live_server.api.post("/jobs", json={**job_body(max_steps=200), "nproc": 2}).json()
    start_agent(use_torchrun=True)
    deadline = time.time() + 60
    while live_server.api.get(f"/jobs/{job['id']}").json()["step"] < 2:
        assert time.time() < deadline
        time.sleep(0.1)
    live_server.api.post(f"/jobs/{job['id']}/cancel")
    done = live_server.wait_for(job["id"], {"cancelled", "failed", "succeeded"}, timeout=30)
    assert done["state"] == "cancelled" and done["exit_code"] == 0, done
    lines = [x["line"] for x in live_server.api.get(f"/jobs/{job['id']}/logs").json()["data"]]
    assert not [x for x in lines if "Traceback" in x or "SignalException" in x], lines[-20:]


@pytest.mark.slow
def test_ranks_that_ignore_sigterm_die_with_their_torchrun(live_server, start_agent, job_body):
    """torchrun puts each rank in a session of its own: killing torchrun's group alone would leave them."""
    job = live_server.api.post("/jobs", json={**job_body(name="stubborn", max_steps=1), "nproc": 2}).json()
    start_agent(use_torchrun=True, kill_grace_s=1.0)
    deadline = time.time() + 60
    while len(_pid_files(job)) < 2 or live_server.api.get(f"/jobs/{job['id']}").json()["step"] < 1:
        assert time.time() < deadline
        time.sleep(0.1)
    pid_files = _pid_files(job)
    assert len({p["pgid"] for p in pid_files}) == 2  # (what makes this test necessary)
    live_server.api.post(f"/jobs/{job['id']}/cancel")
    assert live_server.wait_for(job["id"], {"cancelled"}, timeout=30)["state"] == "cancelled"
    # gone before the job's end was reported (its GPUs free, its output dir no one's)
    wait_gone([p for info in pid_files for p in (info["pid"], info["child"])], timeout=0)


def test_an_unreadable_token_file_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    paratrain = str(Path(sys.executable).with_name("paratrain"))
    proc = subprocess.run([paratrain, "worker", "--server", "http://127.0.0.1:9", "--token-file",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"paratrain worker: --token-file {tmp_path / 'missing'}: No such file or directory"


@pytest.mark.parametrize("flag, value, message", [
    ("--gpus", "abc", "gpus: 'abc' is not 'auto', 'none' or GPU indices like '0,1'"),
    ("--max-cpu-jobs", "-1", "max_cpu_jobs: Input should be greater than or equal to 0"),
    ("--server", "127.0.0.1:8000", "server_url: '127.0.0.1:8000' needs its scheme: http://127.0.0.1:8000"),
])
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(flag, value, message):
    """Not a traceback, and not a worker retrying a URL without a scheme forever as 'unreachable'."""
    import subprocess
    import sys

    paratrain = str(Path(sys.executable).with_name("paratrain"))
    args = {"--server": "http://127.0.0.1:9", flag: value}
    proc = subprocess.run([paratrain, "worker", "--token-file", "/dev/null", *(x for kv in args.items() for x in kv)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"paratrain worker: {message}", proc.stderr


def test_a_wrong_token_stops_the_worker_with_an_error(start_agent, caplog):
    caplog.set_level(logging.INFO, logger="paratrain.server")
    running = start_agent(token="not-the-worker-token")
    running.thread.join(10)
    assert not running.thread.is_alive() and running.exit_code == 1
    # the server's operator learns of it too: a worker out there is refused
    assert any("refused a worker call with a wrong token from 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_a_server_url_with_a_path_stops_the_worker_with_a_hint(live_server, start_agent, caplog):
    caplog.set_level(logging.INFO, logger="paratrain.worker")
    running = start_agent(server_url=live_server.url + "/api")    # the API's URL, not the server's
    running.thread.join(10)
    assert not running.thread.is_alive() and running.exit_code == 1
    assert any(f"no paratrain server at {live_server.url}/api" in r.getMessage() and "root URL" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_gpu_indices_are_checked_against_the_machines(monkeypatch, caplog):
    import worker.gpus as gpus

    monkeypatch.setattr(gpus, "_nvml_gpus", lambda: [{"index": 0, "name": "H100", "memory_gb": 79.6}])
    assert gpus.detect_gpus("0") == [{"index": 0, "name": "H100", "memory_gb": 79.6}]
    with pytest.raises(ValueError, match=r"--gpus 0,3: this machine has GPU\(s\) \[0\] only"):
        gpus.detect_gpus("0,3")
    # no NVML at all (no driver, or one it cannot reach): taken on trust, with a warning an operator sees
    monkeypatch.setattr(gpus, "_nvml_gpus", lambda: [])
    caplog.set_level(logging.INFO, logger="paratrain.worker")
    assert [g["index"] for g in gpus.detect_gpus("0")] == [0]
    assert any(r.levelno == logging.WARNING and "train on the CPU" in r.getMessage() for r in caplog.records)


def test_a_worker_registers_again_when_the_server_forgot_it(live_server, start_agent):
    from sqlmodel import Session, delete

    from server.models import Worker

    running = start_agent()
    deadline = time.time() + 10
    while not live_server.api.get("/workers").json()["data"]:
        assert time.time() < deadline
        time.sleep(0.05)
    with Session(live_server.app.state.write_engine) as session:  # as if the database had been replaced
        session.exec(delete(Worker))
        session.commit()
    while not live_server.api.get("/workers").json()["data"]:
        assert time.time() < deadline, "the worker did not register again"
        time.sleep(0.05)
    assert running.thread.is_alive()


def test_a_worker_the_server_counts_as_left_registers_again(live_server, start_agent):
    """A leave the worker did not mean (sent by another client, or answered after the worker went on): its
    heartbeat gets a 409 and it registers again, instead of running on as an offline worker that claims nothing."""
    running = start_agent()
    deadline = time.time() + 10

    def listed() -> list[dict]:
        return live_server.api.get("/workers").json()["data"]

    while not (listed() and listed()[0]["online"]):
        assert time.time() < deadline
        time.sleep(0.05)
    worker_id = listed()[0]["id"]
    headers = {"Authorization": f"Bearer {live_server.app.state.tokens.worker}"}
    assert live_server.api.post(f"/workers/{worker_id}/leave", json={}, headers=headers).status_code == 204
    assert not listed()[0]["online"]
    while not listed()[0]["online"]:
        assert time.time() < deadline + 10, "the worker did not register again"
        time.sleep(0.05)
    assert running.thread.is_alive() and listed()[0]["id"] == worker_id


def test_a_second_process_under_the_same_name_takes_over_and_the_first_stops(live_server, start_agent,
                                                                            monkeypatch, job_body):
    """Two workers sharing a name (a copied config) must not both run jobs: the later registration wins,
    the earlier process learns it at its next heartbeat and stops instead of registering back."""
    from worker.agent import EXIT_SUPERSEDED

    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    job = live_server.api.post("/jobs", json=job_body(max_steps=15)).json()
    first = start_agent()
    wait_for_step(live_server, job["id"], 2)
    second = start_agent()
    first.thread.join(15)
    assert not first.thread.is_alive() and first.exit_code == EXIT_SUPERSEDED
    done = live_server.wait_for(job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded" and done["attempt"] >= 2      # finished by the second process
    [worker] = live_server.api.get("/workers").json()["data"]
    assert worker["online"] and second.thread.is_alive()                 # the first did not sign it off


def test_workers_of_the_same_name_on_other_servers_leave_each_others_runs_alone():
    """Two `paratrain serve` instances on one host both call their worker by the hostname: the orphan sweep
    of one must not kill the other's training."""
    import subprocess

    from worker.runner import LAUNCHED_BY_ENV, find_orphans, kill_groups
    from worker.settings import WorkerSettings

    mine = WorkerSettings(name="host", server_url="http://127.0.0.1:8000")
    other = WorkerSettings(name="host", server_url="http://127.0.0.1:9000")
    assert mine.identity != other.identity
    proc = subprocess.Popen(["sleep", "30"], env={**os.environ, LAUNCHED_BY_ENV: other.identity},
                            start_new_session=True)
    try:
        assert proc.pid not in find_orphans(mine.identity)
        assert proc.pid in find_orphans(other.identity)
    finally:
        kill_groups([proc.pid], 1)
        proc.wait(5)


def test_an_error_status_is_an_answer_logged_once_a_minute_not_an_outage(caplog):
    """A server that takes the heartbeat but answers one job's report with 500 is not "unreachable": the
    log must not flap between "unreachable" and "reachable again" on every retry."""
    import httpx

    from worker.agent import OutageLog

    caplog.set_level(logging.INFO, logger="paratrain.worker")
    request = httpx.Request("POST", "http://server/api/jobs/7/report")
    error = httpx.HTTPStatusError("500", request=request, response=httpx.Response(500, request=request))
    outage = OutageLog()
    for _ in range(5):
        outage.failed("job 7's report", error)
        outage.answered()   # the heartbeat thread's call went through
    assert [r.getMessage() for r in caplog.records] == [
        "the server answered 500 to job 7's report; retrying, and keeping what is not delivered"]
    outage.failed("claim", httpx.ConnectError("refused"))
    outage.failed("claim", httpx.ConnectError("refused"))
    outage.answered()
    assert [r.getMessage().split(" (")[0] for r in caplog.records[1:]] == [
        "server unreachable", "server reachable again after 0 s"]


@pytest.mark.parametrize("next_attempt_starts_meanwhile", [True, False])
def test_a_stop_for_one_attempt_does_not_stop_the_jobs_next_attempt(next_attempt_starts_meanwhile):
    """A gang re-forming: the server still names the job in its heartbeat reply because that reply was about
    the attempt this worker had just ended; by the time it arrives, the worker has claimed the next attempt.
    (A stale stop ended such a two-node job `cancelled` in CI.)"""
    from worker.agent import Agent
    from worker.runner import JobRun
    from worker.settings import WorkerSettings

    stopped: list[int] = []

    def run_of(attempt: int) -> JobRun:
        run = JobRun(job_id=1, attempt=attempt, gpu_ids=[], argv=["trainer"], env={})
        run.stop = lambda reason, grace_s: stopped.append(attempt)
        return run

    class Client:
        def heartbeat(self, worker_id, running_job_ids, stopping):
            assert running_job_ids == [1]
            if next_attempt_starts_meanwhile:   # the main loop, while this request is in flight
                agent.runs = {1: run_of(2)}
            return [1]

    agent = Agent(WorkerSettings(name="w"), Client(), gpus=[])
    agent.worker_id = 7
    agent.runs = {1: run_of(1)}
    agent._beat(7)
    agent._apply_cancels()
    assert stopped == ([] if next_attempt_starts_meanwhile else [1])


def test_a_worker_does_not_claim_a_job_whose_earlier_attempt_it_still_runs():
    from worker.agent import Agent
    from worker.runner import JobRun, Outcome
    from worker.settings import WorkerSettings

    asked: list[list[int]] = []

    class Client:
        def claim(self, worker_id, **request):
            asked.append(request["busy_job_ids"])

    agent = Agent(WorkerSettings(name="w", max_cpu_jobs=3), Client(), gpus=[])
    agent.worker_id = 7
    agent.runs = {4: JobRun(job_id=4, attempt=1, gpu_ids=[], argv=["trainer"], env={})}   # told to stop, exiting
    agent.finished = {2: (JobRun(job_id=2, attempt=3, gpu_ids=[], argv=["trainer"], env={}), Outcome(0, None, ""))}
    agent._claim()
    assert asked == [[2, 4]]


ORPHAN_TRAINER = """
import pathlib, signal, sys, time
saved = pathlib.Path(sys.argv[1])
stop = []
def handle(signum, frame):
    if stop:            # the trainer's rule: a second signal exits without a new checkpoint
        sys.exit(130)
    stop.append(signum)
signal.signal(signal.SIGTERM, handle)
pathlib.Path(sys.argv[2]).touch()
while not stop:
    time.sleep(0.01)
time.sleep(1.0)         # saving
saved.write_text("checkpoint")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_restarted_worker_lets_its_predecessors_trainers_finish_their_checkpoint(tmp_path):
    """The dead worker's trainers got their death signal and are saving: the new worker must not send the
    second signal that makes them exit without it."""
    import subprocess

    from worker.agent import Agent
    from worker.client import Unauthorized
    from worker.runner import LAUNCHED_BY_ENV, find_orphans
    from worker.settings import WorkerSettings

    class Client:   # the new worker stops right after its start-up sweep
        def register(self, **_):
            raise Unauthorized("stop here")

    settings = WorkerSettings(name="box", server_url="http://127.0.0.1:8123", kill_grace_s=10)
    identity = settings.identity
    saved, ready = tmp_path / "saved", tmp_path / "ready"
    old_worker = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-m', 'worker.launch', str(os.getpid()), "
        f"sys.executable, '-c', {ORPHAN_TRAINER!r}, {str(saved)!r}, {str(ready)!r}], start_new_session=True); "
        "time.sleep(60)")], env={**os.environ, LAUNCHED_BY_ENV: identity}, cwd=Path(__file__).parents[2])
    deadline = time.time() + 20
    while not ready.exists():
        assert time.time() < deadline, "the trainer did not start"
        time.sleep(0.05)
    old_worker.kill()
    old_worker.wait()
    assert find_orphans(identity)
    assert Agent(settings, Client(), gpus=[]).run() == 1
    assert saved.read_text() == "checkpoint" and not find_orphans(identity)


def test_a_stale_unknown_worker_reply_does_not_register_the_worker_again():
    """After the server lost the worker (a new database), a heartbeat still in flight under the old id is
    answered 404 after the worker registered again: a third registration would re-queue its new job."""
    from worker.agent import Agent
    from worker.settings import WorkerSettings

    registered: list[str] = []
    agent = Agent(WorkerSettings(name="w"), client=None, gpus=[])
    agent._register = lambda: registered.append("again") or True
    agent.worker_id = 8            # registered again already, as worker 8
    agent._forgotten_id = 7        # the late 404 of a beat sent as worker 7
    agent._register_again_if_forgotten()
    assert registered == []
    agent._forgotten_id = 8
    agent._register_again_if_forgotten()
    assert registered == ["again"]


def test_a_stopping_worker_tells_the_server_before_it_hands_its_jobs_back():
    """The server must know the worker is stopping before the gang's other nodes stop and report."""
    import threading

    from server.models import WorkerRegistered
    from worker.agent import Agent
    from worker.runner import Outcome, StopReason
    from worker.settings import WorkerSettings

    calls: list[str] = []

    class Run:
        job_id, attempt, gpu_ids, stop_reason = 3, 1, [], None

        def stop(self, reason, grace_s):
            calls.append(f"stop {reason.value}")
            self.stop_reason = reason

        def poll(self):
            return 0 if self.stop_reason else None

        def outcome(self, code):
            return Outcome(code, None, "worker stopping", release=self.stop_reason == StopReason.release)

        def take_batch(self):
            from worker.runner import Batch
            return Batch(metrics=[], logs=[], log_start=0)

    class Client:
        def register(self, **_):
            agent._on_signal(15, None)   # the stop signal comes while a job runs
            return WorkerRegistered(worker_id=1, heartbeat_interval_s=60, lease_ttl_s=120)

        def heartbeat(self, worker_id, running_job_ids, stopping):
            calls.append(f"heartbeat stopping={stopping}")
            return []

        def finish(self, job_id, **finish):
            calls.append(f"finish release={finish['release']}")

        def leave(self, worker_id):
            calls.append("leave")

    agent = Agent(WorkerSettings(name="w", stop_mode="cold", report_interval_s=0.01), Client(), gpus=[])
    agent.runs = {3: Run()}
    agent._claim = lambda: None
    agent._heartbeat_loop = lambda stopped: None   # only the main loop's calls, in their order
    done = threading.Event()
    threading.Thread(target=lambda: (agent.run(), done.set()), daemon=True).start()
    assert done.wait(10)
    assert calls == ["heartbeat stopping=True", "stop release", "finish release=True", "leave"]


def test_a_job_whose_finish_was_refused_is_not_taken_back_before_its_lease_ran_out():
    """The server would otherwise offer that attempt again (as a lost claim answer), to end the same way."""
    from worker.agent import Agent
    from worker.client import Refused
    from worker.runner import JobRun, Outcome
    from worker.settings import WorkerSettings

    asked: list[list[int]] = []

    class Client:
        def finish(self, job_id, **_):
            raise Refused("422: failure_reason too long")

        def claim(self, worker_id, **request):
            asked.append(request["busy_job_ids"])

    agent = Agent(WorkerSettings(name="w"), Client(), gpus=[])
    agent.worker_id, agent.lease_ttl_s = 7, 0.2
    agent._finish(JobRun(job_id=5, attempt=1, gpu_ids=[], argv=["trainer"], env={}), Outcome(0, None, None))
    agent._claim()
    time.sleep(0.5)
    agent._next_claim = 0.0
    agent._claim()
    assert asked == [[5], []]


@pytest.mark.parametrize("server_settings", [{"heartbeat_interval_s": 30.0, "lease_ttl_s": 60.0}], indirect=True)
def test_a_cancel_reaches_a_printing_job_with_its_next_report_not_its_next_heartbeat(live_server, start_agent,
                                                                                     job_body, monkeypatch):
    """Heartbeats come every few seconds; a job that prints is reported every half second, and the report's
    answer carries the cancel."""
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    job = live_server.api.post("/jobs", json=job_body(max_steps=500)).json()
    start_agent()
    deadline = time.time() + 20
    while live_server.api.get(f"/jobs/{job['id']}").json()["step"] < 2:
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.05)
    asked = time.time()
    live_server.api.post(f"/jobs/{job['id']}/cancel")
    done = live_server.wait_for(job["id"], {"cancelled", "succeeded", "failed"}, timeout=15)
    assert done["state"] == "cancelled" and time.time() - asked < 8, (done, time.time() - asked)
