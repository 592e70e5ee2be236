"""The worker's HTTP client speaks the server's own models: what breaks them is refused on this side, before
it is sent or when it comes back, and never retried."""

from __future__ import annotations

import httpx
import pytest

from server.models import WorkerRegistered
from worker.client import Refused, ServerClient


def test_replies_are_the_servers_models(live_server):
    client = ServerClient(live_server.url, live_server.app.state.tokens.worker)
    reply = client.register(name="w", hostname="h", gpus=[{"index": 0, "name": "H200", "memory_gb": 139.0}])
    assert isinstance(reply, WorkerRegistered) and reply.worker_id >= 1 and reply.heartbeat_interval_s > 0
    assert client.heartbeat(reply.worker_id, []) == []
    assert client.claim(reply.worker_id, free_gpu_indices=[0], accept_cpu_jobs=True) is None   # queue empty


def test_a_body_that_breaks_the_schema_is_refused_before_it_is_sent():
    sent: list[httpx.Request] = []
    client = ServerClient("http://server.invalid", "token")
    client._http = httpx.Client(base_url="http://server.invalid/api",
                                transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(204)))
    with pytest.raises(Refused, match="failure_class"):
        client.finish(1, worker_id=1, attempt=1, exit_code=1, failure_class="bogus", failure_reason=None,
                      release=False)
    with pytest.raises(Refused, match="attempt"):
        client.report(1, worker_id=1, attempt=0, metrics=[], logs=["x"], log_start=0)
    assert sent == []


def test_a_reply_that_does_not_fit_the_schema_is_refused_naming_the_field():
    client = ServerClient("http://server.invalid", "token")
    client._http = httpx.Client(base_url="http://server.invalid/api", transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json={"cancel_job_ids": "all"})))
    with pytest.raises(Refused, match="does not fit this worker's schema.*cancel_job_ids"):
        client.heartbeat(1, [])
