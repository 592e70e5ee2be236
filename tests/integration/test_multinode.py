"""A two-node job with real processes: two `python -m worker` agents on this machine (two "boxes"), each
starting one torchrun that joins the same c10d rendezvous; one node's worker dies mid-job and the gang
resumes from its checkpoint once that worker is back."""

from __future__ import annotations

import json

import pytest

from process_utils import TINY_CONFIG

pytestmark = pytest.mark.slow


def _done_event(lines: list[str]) -> dict:
    for line in lines:
        _, _, text = line.partition("] ")
        if text.startswith("{") and '"event": "done"' in text:
            return json.loads(text)
    raise AssertionError("no done event in the logs")


def test_a_two_node_job_survives_losing_a_node(cluster):
    cluster.start_server()
    loopback = {"PARATRAIN_WORKER_RDZV_ADDRESS": "127.0.0.1"}
    cluster.start_worker("-a", **loopback)
    box_b = cluster.start_worker("-b", **loopback)
    steps = 10
    job = cluster.submit(config={**TINY_CONFIG, "max_steps": steps}, gpus=0, nodes=2)

    cluster.wait(job["id"], lambda j: j["step"] >= 3, timeout=240, what="step 3 on two nodes")
    workers = cluster.api.get("/workers").json()["data"]
    assert sorted(w["name"][-2:] for w in workers if job["id"] in w["running_job_ids"]) == ["-a", "-b"]
    box_b.kill9()  # box b dies; its torchrun gets SIGTERM, and the whole gang saves a checkpoint and stops
    cluster.start_worker("-b", **loopback)  # back under the same name: its node is lost at once, the gang re-forms

    done = cluster.wait_final(job["id"], timeout=300)
    assert done["state"] == "succeeded", cluster.logs()
    assert done["attempt"] == 2 and done["step"] == steps
    lines = [x["line"] for x in cluster.api.get(f"/jobs/{job['id']}/logs", params={"limit": 5000}).json()["data"]]
    # global rank 0 (which prints) sits on whichever node the rendezvous made it; its lines name that node
    assert any(line.startswith("[node ") and "step 1/10" in line for line in lines), "\n".join(lines)
    assert sum("started on 2 workers" in line for line in lines) == 2
    assert any("resuming from" in line for line in lines), "\n".join(lines)
    digests = _done_event(lines)["rank_weight_digests"]
    assert len(digests) == 2 and len(set(digests)) == 1  # both nodes' ranks ended with the same weights
    metrics = cluster.api.get(f"/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert cluster.api.get("/integrity").json()["problems"] == []
