"""`paratrain serve` as a user runs it: one process tree, one data dir, the printed curl line trains."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from process_utils import FAST_LEASES, REPO, TINY_CONFIG, alive, free_port, pids_of

pytestmark = pytest.mark.slow


def _start_serve(data_dir, port, log_path, **extra_env):
    env = {**os.environ, **FAST_LEASES, "PARATRAIN_WORKER_CLAIM_INTERVAL_S": "0.2",
           "PARATRAIN_WORKER_REPORT_INTERVAL_S": "0.2", **extra_env}
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--data-dir", str(data_dir), "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_healthy(proc, port, log_path)
    return proc


def _wait_healthy(proc, port, log_path, timeout_s: float = 90) -> None:
    """Until the server answers /api/health (its data dir, token included, exists before it listens)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)


def _stop_serve(proc):
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def _start_events(api, job_id: int) -> list[str]:
    lines = [x["line"] for x in api.get(f"/jobs/{job_id}/logs", params={"limit": 10000}).json()["data"]]
    return [x for x in lines if '"event": "start"' in x]


def _wait_resumed_then_cancel(api, job_id: int, log_path, runs: int = 2) -> None:
    """The job's run number `runs` started from its checkpoint (not step 0); then it is cancelled."""
    deadline = time.time() + 120
    while len(starts := _start_events(api, job_id)) < runs:
        assert time.time() < deadline, log_path.read_text()[-5000:]
        time.sleep(0.3)
    assert '"resumed_from_step": 0' not in starts[runs - 1]
    api.post(f"/jobs/{job_id}/cancel")
    while api.get(f"/jobs/{job_id}").json()["state"] != "cancelled":
        assert time.time() < deadline
        time.sleep(0.3)


def test_serve_trains_the_demo_and_hands_jobs_back_on_exit(data_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    serve = _start_serve(data_dir, port, log_path)
    try:
        token = (data_dir / "token").read_text().strip()
        banner = log_path.read_text()
        assert "curl -X POST" in banner and "models/tiny-qwen2" in banner
        assert token not in banner and f"$(cat {data_dir / 'token'})" in banner  # stdout is a file: no secret in it
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        assert httpx.get(f"http://127.0.0.1:{port}/api/jobs").status_code == 401
        # the banner's curl line, run as printed, queues the demo job (cancelled: the steps below need the worker)
        [curl_line] = [line.strip() for line in banner.splitlines() if line.strip().startswith("curl -X POST")]
        queued = subprocess.run(["bash", "-c", curl_line], capture_output=True, text=True, timeout=60)
        assert queued.returncode == 0 and queued.stdout.endswith("}\n"), queued.stdout + queued.stderr
        demo = json.loads(queued.stdout)
        assert demo["state"] == "queued" and demo["config"]["base_model"].endswith("models/tiny-qwen2")
        api.post(f"/jobs/{demo['id']}/cancel")
        # a saved job file, queued and followed to its end by `paratrain submit` (token from the data dir)
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump({**TINY_CONFIG, "max_steps": 4, "val_ratio": 0.2, "eval_interval": 2,
                                            "job": {"gpus": 0}}))
        # no --server: serve wrote its URL in the data dir, where submit looks as it does for the token
        submit = subprocess.run([sys.executable, "-m", "paratrain", "submit", str(job_file), "--follow"],
                                cwd=REPO, env={**os.environ, "PARATRAIN_DATA_DIR": str(data_dir)},
                                capture_output=True, text=True, timeout=150)
        assert submit.returncode == 0, submit.stdout + submit.stderr + log_path.read_text()[-5000:]
        assert "step 4/4  loss" in submit.stdout and "succeeded; outputs in" in submit.stdout, submit.stdout
        # the validation loss, from the trainer through the worker and the server to the API and the follower
        assert re.search(r"step 2/4  loss \S+  val loss \d", submit.stdout), submit.stdout
        [followed] = api.get("/jobs", params={"limit": 1}).json()["data"]
        points = api.get(f"/jobs/{followed['id']}/metrics").json()["data"]
        assert [p["step"] for p in points if p["val_loss"] is not None] == [0, 2, 4], points
        seen = [p["tokens_seen"] for p in points]   # what Compare plots against, stored as the trainer counted
        assert seen[0] == 0 and all(a < b for a, b in zip(seen, seen[1:])) and points[-1]["train_s"] > 0, points
        assert followed["last_val_loss"] == points[-1]["val_loss"]
        assert f"the adapter of the lowest validation loss: {followed['config']['output_dir']}/adapter_best/" \
            in submit.stdout
        deadline = time.time() + 120

        long_job = api.post("/jobs", json={"config": {**TINY_CONFIG, "max_steps": 500}, "gpus": 0}).json()
        while api.get(f"/jobs/{long_job['id']}").json()["step"] < 2:
            assert time.time() < deadline, log_path.read_text()[-5000:]
            time.sleep(0.3)
        # A local worker that serve had to restart hands its jobs back on Ctrl-C like the first one: it must
        # not die with the thread that restarted it (the parent-death signal follows the thread).
        [worker] = [p for p in _children(serve.pid) if alive(p)]
        os.kill(worker, signal.SIGKILL)
        while len(_start_events(api, long_job["id"])) < 2 or api.get(f"/jobs/{long_job['id']}").json()["step"] < 2:
            assert time.time() < deadline + 60, log_path.read_text()[-5000:]
            time.sleep(0.3)
        pids = pids_of(long_job["config"]["output_dir"])
        _stop_serve(serve)  # Ctrl-C: the local worker hands the job back before the API goes away
        assert not [p for p in pids if alive(p)]
        # and says so, without first promising to wait for the job ("signal again to hand them back")
        said = log_path.read_text()
        assert "stopping the local worker: running jobs save a checkpoint" in said and "waiting for job" not in said

        serve = _start_serve(data_dir, port, log_path)
        back = api.get(f"/jobs/{long_job['id']}").json()
        assert back["attempt"] == 3 and back["state"] in ("queued", "running"), back
        assert back["max_attempts"] == 4     # the hand-back did not use up an attempt
        lines = [x["line"] for x in api.get(f"/jobs/{long_job['id']}/logs", params={"limit": 10000}).json()["data"]]
        assert any("handed back" in line for line in lines), lines[-20:]
        _wait_resumed_then_cancel(api, long_job["id"], log_path, runs=3)
    finally:
        if serve.poll() is None:
            _stop_serve(serve)


@pytest.mark.parametrize("stop", ["kill -9", "Ctrl-C twice"])
def test_serve_stopped_at_once_takes_its_worker_along_and_the_restart_resumes_the_job(data_dir, tmp_path, stop):
    """A local worker outliving its server would keep running jobs under the name the restarted server's
    worker registers with: two workers in one name, a finished job run again, two jobs on one CPU slot.
    A second Ctrl-C means "now": serve must not wait for its worker's hand-back (which retried its reports
    against the stopped API for a minute)."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    serve = _start_serve(data_dir, port, log_path)
    try:
        token = (data_dir / "token").read_text().strip()
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        job = api.post("/jobs", json={"config": {**TINY_CONFIG, "max_steps": 500}, "gpus": 0}).json()
        deadline = time.time() + 120
        while api.get(f"/jobs/{job['id']}").json()["step"] < 2:
            assert time.time() < deadline, log_path.read_text()[-5000:]
            time.sleep(0.3)
        [worker] = [p for p in _children(serve.pid) if alive(p)]
        trainers = pids_of(job["config"]["output_dir"])
        assert trainers
        if stop == "kill -9":
            serve.kill()
        else:
            serve.send_signal(signal.SIGINT)
            time.sleep(0.3)
            serve.send_signal(signal.SIGINT)
        serve.wait(10)
        deadline = time.time() + 30
        while [p for p in [worker, *trainers] if alive(p)]:
            assert time.time() < deadline, f"left running: {[p for p in [worker, *trainers] if alive(p)]}"
            time.sleep(0.2)

        serve = _start_serve(data_dir, port, log_path)
        _wait_resumed_then_cancel(api, job["id"], log_path)
        assert [w["name"] for w in api.get("/workers").json()["data"]] == [f"{os.uname().nodename}-local"]
    finally:
        if serve.poll() is None:
            _stop_serve(serve)


def test_serve_refuses_bad_settings_and_a_busy_port_before_starting_anything(tmp_path):
    import socket

    def serve(*args, **env):
        return subprocess.run([sys.executable, "-m", "server", "--no-demo", "--data-dir", str(tmp_path / "d"), *args],
                              cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)

    bad_port = serve("--port", "99999", "--no-worker")
    assert bad_port.returncode == 2 and bad_port.stderr.strip() == "paratrain serve: port: Input should be less " \
                                                                     "than or equal to 65535"
    bad_env = serve("--no-worker", PARATRAIN_LEASE_TTL_S="2")
    assert bad_env.returncode == 2 and "lease_ttl_s must be longer than heartbeat_interval_s" in bad_env.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = serve("--port", str(busy.getsockname()[1]))     # with its local worker: none may start
    assert taken.returncode == 2 and "Address already in use" in taken.stderr
    assert "paratrain is running" not in taken.stdout and not (tmp_path / "d" / "worker_token").exists()
    # a data dir another server uses (its lock held here), or one that cannot be made
    import fcntl

    (tmp_path / "d").mkdir(exist_ok=True)
    with open(tmp_path / "d" / "server.lock", "w") as held:
        held.write("pid 4242 on box1\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        shared = serve("--no-worker", "--port", str(free_port()))
    assert shared.returncode == 2, shared.stderr
    assert f"--data-dir {tmp_path / 'd'} is in use by another paratrain serve (pid 4242 on box1)" in shared.stderr
    (tmp_path / "a-file").write_text("")
    unmakeable = subprocess.run([sys.executable, "-m", "server", "--no-demo", "--no-worker", "--port", str(free_port()),
                                 "--data-dir", str(tmp_path / "a-file" / "data")], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
    assert unmakeable.returncode == 2 and f"--data-dir {tmp_path / 'a-file' / 'data'}: Not a directory" in \
        unmakeable.stderr, unmakeable.stderr
    for proc in (bad_port, bad_env, taken, shared, unmakeable):
        assert "Traceback" not in proc.stderr


def test_serve_with_tokens_from_the_environment_starts_its_local_worker(data_dir, tmp_path):
    """Tokens set by environment (as docker-compose sets them) are in no file: the local worker used to be
    started with --token-file <data_dir>/worker_token, exit 2 and be restarted every 2 s, forever."""
    port, log_path = free_port(), tmp_path / "serve.log"
    (data_dir / "worker_token").write_text("an-older-token\n")   # and an old file must not win over the env
    proc = _start_serve(data_dir, port, log_path, PARATRAIN_WORKER_TOKEN="worker-token-from-env",
                        PARATRAIN_USER_TOKEN="user-token-from-env")
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", timeout=10,
                           headers={"Authorization": "Bearer user-token-from-env"})
        deadline = time.time() + 60
        while not [w for w in api.get("/workers").json()["data"] if w["online"]]:
            assert time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        assert "starting it again" not in log_path.read_text()
    finally:
        _stop_serve(proc)


def test_the_banner_of_a_server_without_a_local_worker_says_how_to_attach_one(tmp_path):
    from server.cli import banner

    text = banner("http://127.0.0.1:8000", "tok", ui=True, worker_token_file=tmp_path / "worker_token")
    assert ("paratrain worker --server http://127.0.0.1:8000 --token-file "
            f"{tmp_path / 'worker_token'} --name <unique name>") in text
    assert "Attach a worker" not in banner("http://127.0.0.1:8000", "tok", ui=True)   # a local worker runs


def test_the_local_worker_takes_its_name_and_gpus_from_the_worker_settings_unless_serve_names_them():
    """PARATRAIN_WORKER_* apply to serve's worker as to any other: serve names only its own URL, and the
    name and GPUs when nothing else does."""
    from server.cli import local_worker_command

    def flags(gpus, **environ):
        argv = local_worker_command("http://127.0.0.1:8000", gpus, environ)
        worker = argv[argv.index("worker"):]
        return {flag: worker[i + 1] for i, flag in enumerate(worker) if flag.startswith("--")}

    assert flags(None) == {"--server": "http://127.0.0.1:8000", "--name": f"{os.uname().nodename}-local"}
    assert flags("none", PARATRAIN_WORKER_NAME="box-3") == {"--server": "http://127.0.0.1:8000", "--gpus": "none"}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH came with Python 3.11")
def test_serve_started_in_another_checkout_runs_its_own_worker_and_trainer(data_dir, tmp_path):
    """`python -m` puts the working directory first on sys.path: serve started inside an older clone of
    paratrain ran that clone's worker, which failed every job ("cannot run the stored config")."""
    stale = tmp_path / "old-clone"
    for package in ("worker", "trainer_core"):
        (stale / package).mkdir(parents=True)
        (stale / package / "__init__.py").write_text("raise SystemExit('the old clone ran: ' + __name__)\n")
    port, log_path = free_port(), tmp_path / "serve.log"
    paratrain = os.path.join(os.path.dirname(sys.executable), "paratrain")   # the console script, as users run it
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([paratrain, "serve", "--no-demo", "--data-dir", str(data_dir), "--port", str(port)],
                                cwd=stale, env={**os.environ, **FAST_LEASES}, stdout=log, stderr=subprocess.STDOUT)
    try:
        token = data_dir / "token"
        _wait_healthy(proc, port, log_path)
        deadline = time.time() + 90
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api", timeout=10,
                           headers={"Authorization": f"Bearer {token.read_text().strip()}"})
        job = api.post("/jobs", json={"config": {**TINY_CONFIG, "max_steps": 2}, "gpus": 0}).json()
        while (state := api.get(f"/jobs/{job['id']}").json())["state"] not in ("succeeded", "failed"):
            assert time.time() < deadline + 90, log_path.read_text()[-3000:]
            time.sleep(0.3)
        assert state["state"] == "succeeded", (state, log_path.read_text()[-3000:])
        assert "the old clone ran" not in log_path.read_text()
    finally:
        _stop_serve(proc)
