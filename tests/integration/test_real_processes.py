"""The acceptance path with real processes: uvicorn server, `python -m worker`, torchrun + the trainer on CPU."""

from __future__ import annotations

import json
import time

import pytest

from process_utils import TINY_CONFIG, alive, pids_of, read_sse

pytestmark = pytest.mark.slow


def _metric_steps(cluster, job_id: int) -> list[int]:
    return [m["step"] for m in cluster.api.get(f"/jobs/{job_id}/metrics").json()["data"]]


def test_submit_train_stream_and_load_artifacts(cluster, tmp_path):
    cluster.start_server()
    cluster.start_worker()
    job = cluster.submit(config={**TINY_CONFIG, "max_steps": 3}, gpus=0)
    url = f"{cluster.url}/api/jobs/{job['id']}/events"
    token = cluster.api.headers["Authorization"].split()[1]
    # Read a few events, drop the connection, resume from the last id: nothing lost, nothing twice.
    first = read_sse(url, token, max_events=3)
    rest = read_sse(url, token, last_event_id=first[-1]["id"])
    events = first + rest
    assert [e["id"] for e in events] == list(range(1, len(events) + 1)), cluster.logs()
    assert events[-1]["event"] == "state" and events[-1]["data"]["state"] == "succeeded", cluster.logs()
    assert [e["data"]["step"] for e in events if e["event"] == "metric"] == [1, 2, 3]
    assert any(e["event"] == "log" and "step 3/3" in e["data"]["line"] for e in events)
    assert [e["data"]["state"] for e in events if e["event"] == "state"][:2] == ["queued", "running"]

    done = cluster.job(job["id"])
    assert done["exit_code"] == 0 and done["step"] == 3 and done["last_loss"] > 0
    assert _metric_steps(cluster, job["id"]) == [1, 2, 3]

    listed = {a["path"] for a in cluster.api.get(f"/jobs/{job['id']}/artifacts").json()["data"]}
    wanted = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/rope2d.json",
              "lora/paratrain_tiny-qwen2_final.pth"]
    assert set(wanted) <= listed
    download = tmp_path / "download"
    for path in wanted:
        target = download / path
        target.parent.mkdir(parents=True, exist_ok=True)
        r = cluster.api.get(f"/jobs/{job['id']}/artifacts/{path}")
        assert r.status_code == 200
        target.write_bytes(r.content)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cluster.data_dir / "models" / "tiny-qwen2")
    model = PeftModel.from_pretrained(base, download / "adapter")
    assert any("lora_" in name for name, _ in model.named_parameters())
    state = torch.load(download / "lora/paratrain_tiny-qwen2_final.pth", map_location="cpu")
    assert state and all("lora" in key for key in state)


def test_worker_killed_mid_job_resumes_from_checkpoint(cluster):
    cluster.start_server()
    first_worker = cluster.start_worker()
    steps = 8
    # no periodic checkpoint: the one the trainers save on their parent-death signal is the only one
    job = cluster.submit(config={**TINY_CONFIG, "max_steps": steps, "save_interval": 100}, gpus=0)
    seen = cluster.wait(job["id"], lambda j: j["step"] >= 3, what="step 3")["step"]
    first_worker.kill9()
    cluster.start_worker()  # same name: kills the old process group's leftovers, its old jobs re-queue at once
    done = cluster.wait_final(job["id"])
    assert done["state"] == "succeeded", cluster.logs()
    assert done["attempt"] == 2
    assert _metric_steps(cluster, job["id"]) == list(range(1, steps + 1)), cluster.logs()
    token = cluster.api.headers["Authorization"].split()[1]
    events = read_sse(f"{cluster.url}/api/jobs/{job['id']}/events", token)
    metric_steps = [e["data"]["step"] for e in events if e["event"] == "metric"]
    assert sorted(set(metric_steps)) == list(range(1, steps + 1))
    logs = [x["line"] for x in cluster.api.get(f"/jobs/{job['id']}/logs", params={"limit": 10000}).json()["data"]]
    starts = [json.loads(x) for x in logs if '"event": "start"' in x]
    # continued from the step it had reached, not from an earlier checkpoint: a stop signal that reached the
    # trainer twice (torchrun forwards each parent-death SIGTERM) once made it exit without saving
    assert len(starts) == 2 and starts[1]["resumed_from_step"] >= seen, (seen, starts)
    assert cluster.api.get("/integrity").json() == {"ok": True, "problems": []}  # server/integrity.py


def test_server_killed_mid_job_loses_nothing(cluster):
    cluster.start_server()
    cluster.start_worker()
    steps = 8
    job = cluster.submit(config={**TINY_CONFIG, "max_steps": steps}, gpus=0)
    cluster.wait(job["id"], lambda j: j["step"] >= 2, what="step 2")
    cluster.server.kill9()
    time.sleep(4)  # longer than a lease (3 s): the restarted server must not re-queue the job
    cluster.start_server()
    done = cluster.wait_final(job["id"])
    assert done["state"] == "succeeded" and done["attempt"] == 1, cluster.logs()
    assert _metric_steps(cluster, job["id"]) == list(range(1, steps + 1)), cluster.logs()
    logs = [x["line"] for x in cluster.api.get(f"/jobs/{job['id']}/logs", params={"limit": 10000}).json()["data"]]
    assert [x for x in logs if x.startswith("step ") and "/" in x.split()[1]] == \
           [x for x in logs if x.startswith("step ")]  # sanity: progress lines present
    assert [int(x.split()[1].split("/")[0]) for x in logs if x.startswith("step ")] == list(range(1, steps + 1))
    assert cluster.api.get("/integrity").json() == {"ok": True, "problems": []}


def test_cancel_a_two_process_job_leaves_no_process(cluster):
    cluster.start_server()
    cluster.start_worker()
    job = cluster.submit(config={**TINY_CONFIG, "max_steps": 500}, gpus=0, nproc=2)
    running = cluster.wait(job["id"], lambda j: j["step"] >= 1, what="step 1")
    pids = pids_of(running["config"]["output_dir"])
    assert len(pids) >= 3, pids  # torchrun + 2 ranks
    cluster.api.post(f"/jobs/{job['id']}/cancel")
    done = cluster.wait_final(job["id"], timeout=60)
    assert done["state"] == "cancelled" and done["failure_class"] == "cancelled"
    deadline = time.time() + 5
    while any(alive(p) for p in pids):
        assert time.time() < deadline, [p for p in pids if alive(p)]
        time.sleep(0.1)
    assert not [p for p in pids_of(running["config"]["output_dir"]) if alive(p)]
