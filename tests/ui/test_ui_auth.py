"""Gradio's own HTTP API (/ui/gradio_api/...) without a login: the UI keeps the token in per-session
server-side state, so a direct call starts a session with no token and every handler refuses with a clear
message instead of answering with data (issue 6)."""

from __future__ import annotations

import httpx


def _endpoints(base: str) -> dict:
    info = httpx.get(f"{base}/ui/gradio_api/info", timeout=30)
    assert info.status_code == 200, info.text
    return info.json()["named_endpoints"]


def _call(base: str, name: str, data: list) -> str:
    """Gradio's two-step call API: POST the inputs, then read the SSE result stream."""
    r = httpx.post(f"{base}/ui/gradio_api/call{name}", json={"data": data}, timeout=30)
    if r.status_code != 200:
        return f"HTTP {r.status_code} {r.text}"
    event_id = r.json()["event_id"]
    with httpx.stream("GET", f"{base}/ui/gradio_api/call{name}/{event_id}", timeout=60) as s:
        return "".join(s.iter_text())


def test_gradio_endpoints_without_login_return_no_data(live_server, scripted_worker):
    base = live_server.base_url
    with live_server.api() as api:  # something secret to leak: a job with a recognisable name
        r = api.post("/api/jobs", json={"config": {"base_model": "models/tiny", "data_path": "demo.jsonl",
                                                   "name": "secret-job-name"}, "gpus": 1})
        assert r.status_code == 201, r.text
        jobs_before = api.get("/api/jobs").json()["count"]
    endpoints = _endpoints(base)
    assert endpoints, "Gradio exposes no API endpoint?"
    called = 0
    for name, spec in endpoints.items():
        data = [p.get("example_input") if p.get("example_input") is not None else p.get("parameter_default")
                for p in spec["parameters"]]
        out = _call(base, name, data)
        called += 1
        assert "secret-job-name" not in out, (name, out[:2000])
        assert live_server.token not in out
    # the handlers that take a token: a wrong one is refused with a clear message, a right one works
    out = _call(base, "/login", ["wrong-token", {"token": None, "job_id": None}, {}])
    assert "Wrong token" in out and "secret-job-name" not in out, out[:2000]
    out = _call(base, "/restore", [{"token": "wrong-token", "job_id": None}, {}, "jobs"])
    assert "no longer valid" in out and "secret-job-name" not in out, out[:2000]
    out = _call(base, "/login", [live_server.token, {"token": None, "job_id": None}, {}])
    assert "secret-job-name" in out, out[:2000]  # the same call with the token does answer with data
    with live_server.api() as api:
        assert api.get("/api/jobs").json()["count"] == jobs_before  # nothing was submitted either
    assert called >= 3


def test_gradio_upload_route_refuses_big_files(live_server):
    """Gradio's upload route needs no login; the UI only uploads job YAMLs, so it takes at most 1 MB."""
    r = httpx.post(f"{live_server.base_url}/ui/gradio_api/upload",
                   files={"files": ("big.yaml", b"a: 1\n" * 400_000)}, timeout=30)
    assert r.status_code in (400, 413), (r.status_code, r.text[:500])
    small = httpx.post(f"{live_server.base_url}/ui/gradio_api/upload", files={"files": ("c.yaml", b"a: 1\n")},
                       timeout=30)
    assert small.status_code == 200, small.text[:500]



def test_ui_callbacks_waiting_on_the_api_leave_the_api_its_threads(live_server):
    """Every UI callback waits on an HTTP call to the API in this same process. Sharing Starlette's one pool of
    threads with the API's handlers, as many waiting callbacks as the pool has threads (40; a dozen open tabs at
    a slow moment) would hold every thread their calls need, and the API, worker heartbeats included, would
    answer nobody until those calls timed out. Here the pool is cut to 4 threads and 12 logins run at once."""
    from concurrent.futures import ThreadPoolExecutor

    import anyio.to_thread

    async def shrink_pool() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 4

    live_server.app.add_api_route("/test-shrink-pool", shrink_pool)
    assert httpx.get(f"{live_server.base_url}/test-shrink-pool", timeout=10).status_code == 200
    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda _: _call(live_server.base_url, "/login",
                                             [live_server.token, {"token": None, "job_id": None}, {}]), range(12)))
    failed = [out for out in outs if "could not be reached" in out or "Wrong token" in out or "error" in out[:200]]
    assert not failed, f"{len(failed)} of 12 logins failed, e.g. {failed[0][:500]}"
