"""API load test: N concurrent clients creating and reading jobs for D seconds.

    python bench/api_load.py                       # starts its own server on a temp data dir
    python bench/api_load.py --url http://127.0.0.1:8000 --token $(cat .paratrain/token) \\
        --data-path datasets/demo.jsonl --base-model models/tiny-qwen2

Each client loops: create a job, then read the job list, the new job and its metrics (1 write : 3 reads).
No worker runs, so jobs stay queued. Prints requests/s and p50/p99 latency; exits 1 on any 5xx or
connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# as `paratrain serve` runs uvicorn: longer than any pause of a pooled client connection, so the server
# never closes one just as the client sends on it (uvicorn's default is 5 s)
KEEP_ALIVE_S = 75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    (data_dir / "datasets").mkdir(parents=True)
    (data_dir / "datasets" / "bench.jsonl").write_text('{"main": "m", "branches": ["a", "b"]}\n')
    (data_dir / "models" / "bench-model").mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, "PARATRAIN_DATA_DIR": str(data_dir), "PARATRAIN_MOUNT_UI": "false"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "server.main:create_app",
                               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                               "--no-access-log", "--timeout-keep-alive", str(KEEP_ALIVE_S)], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.1)
    return server, url, (data_dir / "token").read_text().strip()


async def client_loop(http: httpx.AsyncClient, body: dict, stop_at: float, latencies: list[float],
                      statuses: Counter) -> None:
    async def call(method: str, path: str, **kw) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = await http.request(method, path, **kw)
        except httpx.HTTPError as e:
            statuses[f"error {type(e).__name__}"] += 1
            return None
        latencies.append(time.perf_counter() - t0)
        statuses[r.status_code] += 1
        return r

    while time.monotonic() < stop_at:
        created = await call("POST", "/api/jobs", json=body)
        await call("GET", "/api/jobs", params={"limit": 20})
        if created is not None and created.status_code == 201:
            job_id = created.json()["id"]
            await call("GET", f"/api/jobs/{job_id}")
            await call("GET", f"/api/jobs/{job_id}/metrics")


async def run_load(url: str, token: str, body: dict, clients: int, duration_s: float) -> tuple[list[float], Counter]:
    latencies: list[float] = []
    statuses: Counter = Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                 limits=limits) as http:
        stop_at = time.monotonic() + duration_s
        await asyncio.gather(*(client_loop(http, body, stop_at, latencies, statuses) for _ in range(clients)))
    return latencies, statuses


def report(latencies: list[float], statuses: Counter, elapsed_s: float, clients: int) -> int:
    server_errors = sum(n for code, n in statuses.items() if isinstance(code, int) and code >= 500)
    failures = sum(n for code, n in statuses.items() if not isinstance(code, int))
    ordered = sorted(latencies)
    p = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000) if ordered else (lambda q: 0.0)
    print(f"clients: {clients}  duration: {elapsed_s:.1f} s  requests: {len(latencies)}")
    print(f"requests/s: {len(latencies) / elapsed_s:.1f}")
    print(f"latency ms: p50 {p(0.50):.1f}  p99 {p(0.99):.1f}  max {p(1.0):.1f}"
          f"  mean {statistics.fmean(ordered) * 1000 if ordered else 0:.1f}")
    print(f"status: {dict(sorted(statuses.items(), key=str))}")
    print(f"5xx: {server_errors}  connection errors: {failures}")
    return 1 if server_errors or failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="A running server; default: start one on a temp data dir.")
    parser.add_argument("--token", help="User token of --url's server.")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds.")
    parser.add_argument("--data-path", default="datasets/bench.jsonl")
    parser.add_argument("--base-model", default="models/bench-model")
    args = parser.parse_args(argv)
    body = {"config": {"base_model": args.base_model, "data_path": args.data_path, "max_steps": 1}, "gpus": 0}
    with tempfile.TemporaryDirectory(prefix="paratrain-bench-") as tmp:
        server = None
        url, token = args.url, args.token
        if url is None:
            server, url, token = start_server(Path(tmp))
        if not token:
            parser.error("--token is required with --url")
        try:
            t0 = time.monotonic()
            latencies, statuses = asyncio.run(run_load(url, token, body, args.clients, args.duration))
            return report(latencies, statuses, time.monotonic() - t0, args.clients)
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
