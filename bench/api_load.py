"""API load test: N concurrent clients creating and reading jobs for D seconds, optionally on top of a
pre-filled queue, with SSE watchers and simulated workers claiming and finishing jobs.

    python bench/api_load.py                       # starts its own server on a temp data dir
    python bench/api_load.py --prefill 10000 --clients 50 --sse 20 --workers 4 --duration 60   # issue 6
    python bench/api_load.py --url http://127.0.0.1:8000 --token $(cat .paratrain/token) \\
        --data-path datasets/demo.jsonl --base-model models/tiny-qwen2

Each client loops: create a job, then read the job list, the new job and its metrics (1 write : 3 reads).
--prefill N queues N jobs first (through server.crud on the server's own DB when the bench starts the
server, else through the API). --sse N keeps N event streams open on queued jobs (a finished job's stream
ends; the watcher opens the next). --workers N registers N simulated workers that claim a job, finish it
at once and claim again: the claims per worker show the queue's fairness. Prints requests/s, p50/p99
latency, SSE events, claims per worker, the server's RSS before and after (own server only); exits 1 on
any 5xx, connection error or SSE error.
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


def prefill_db(data_dir: Path, count: int, body: dict) -> float:
    """`count` queued jobs straight through server.crud (the API's own code path, one transaction)."""
    sys.path.insert(0, str(REPO))
    from sqlmodel import Session

    from server import crud
    from server.db import make_engine, write_engine
    from server.models import JobCreate
    from server.settings import Settings

    t0 = time.monotonic()
    settings = Settings(data_dir=data_dir, mount_ui=False)
    engine = make_engine(settings.database_url)
    job_create = JobCreate(**body)
    with Session(write_engine(engine)) as session:
        for _ in range(count):
            crud.create_job(session=session, job_create=job_create, settings=settings)
        session.commit()
    engine.dispose()
    return time.monotonic() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    (data_dir / "datasets").mkdir(parents=True)
    (data_dir / "datasets" / "bench.jsonl").write_text('{"main": "m", "branches": ["a", "b"]}\n')
    (data_dir / "models" / "bench-model").mkdir(parents=True)
    (data_dir / "models" / "bench-model" / "config.json").write_text("{}")   # the server checks it is a model
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


async def client_loop(http: httpx.AsyncClient, body: dict, stop_at: float, latencies: list[tuple[str, float]],
                      statuses: Counter) -> None:
    async def call(kind: str, method: str, path: str, **kw) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = await http.request(method, path, **kw)
        except httpx.HTTPError as e:
            statuses[f"error {type(e).__name__}"] += 1
            return None
        latencies.append((kind, time.perf_counter() - t0))
        statuses[r.status_code] += 1
        return r

    while time.monotonic() < stop_at:
        created = await call("POST /jobs", "POST", "/api/jobs", json=body)
        await call("GET /jobs", "GET", "/api/jobs", params={"limit": 20})
        if created is not None and created.status_code == 201:
            job_id = created.json()["id"]
            await call("GET /jobs/{id}", "GET", f"/api/jobs/{job_id}")
            await call("GET /jobs/{id}/metrics", "GET", f"/api/jobs/{job_id}/metrics")


async def sse_watcher(url: str, token: str, job_ids: asyncio.Queue, stop_at: float, counts: Counter) -> None:
    """Follows one queued job's events; when its stream ends (the job finished), follows the next one."""
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with asyncio.timeout_at(stop_at):  # the loop's clock is time.monotonic
            await _watch(url, headers, job_ids, stop_at, counts)
    except TimeoutError:
        pass


async def _watch(url: str, headers: dict, job_ids: asyncio.Queue, stop_at: float, counts: Counter) -> None:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(60, read=None)) as http:
        while time.monotonic() < stop_at and not job_ids.empty():
            job_id = job_ids.get_nowait()
            try:
                async with http.stream("GET", f"/api/jobs/{job_id}/events") as r:
                    if r.status_code != 200:
                        counts[f"sse status {r.status_code}"] += 1
                        continue
                    counts["sse streams"] += 1
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            counts["sse events"] += 1
                        if time.monotonic() >= stop_at:
                            return
            except httpx.HTTPError as e:
                counts[f"sse error {type(e).__name__}"] += 1


async def sim_worker(url: str, worker_token: str, name: str, stop_at: float, claims: Counter,
                     statuses: Counter) -> None:
    """Registers, then claims a job, finishes it at once (exit 0) and claims again."""
    headers = {"Authorization": f"Bearer {worker_token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        r = await http.post("/api/workers/register", json={"name": name, "hostname": "bench", "gpus": []})
        r.raise_for_status()
        worker_id = r.json()["worker_id"]
        while time.monotonic() < stop_at:
            try:
                r = await http.post(f"/api/workers/{worker_id}/claim", json={"accept_cpu_jobs": True})
                statuses[r.status_code] += 1
                if r.status_code != 200:
                    await asyncio.sleep(0.1)
                    continue
                job = r.json()["job"]
                claims[name] += 1
                r = await http.post(f"/api/jobs/{job['id']}/finish",
                                    json={"worker_id": worker_id, "attempt": job["attempt"], "exit_code": 0})
                statuses[r.status_code] += 1
            except httpx.HTTPError as e:
                statuses[f"error {type(e).__name__}"] += 1


async def run_load(url: str, token: str, body: dict, clients: int, duration_s: float, *, sse: int = 0,
                   workers: int = 0, worker_token: str = "") -> tuple[list[tuple[str, float]], Counter, Counter,
                                                                      Counter]:
    latencies: list[tuple[str, float]] = []
    statuses: Counter = Counter()
    sse_counts: Counter = Counter()
    claims: Counter = Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                 limits=limits) as http:
        watch: asyncio.Queue = asyncio.Queue()
        if sse:
            # the oldest queued jobs (the list is newest first): the ones the workers claim next
            count = (await http.get("/api/jobs", params={"state": "queued", "limit": 1})).json()["count"]
            queued = await http.get("/api/jobs", params={"state": "queued", "limit": 1000,
                                                         "offset": max(0, count - 1000)})
            for job in reversed(queued.json()["data"]):
                watch.put_nowait(job["id"])
        stop_at = time.monotonic() + duration_s
        tasks = [client_loop(http, body, stop_at, latencies, statuses) for _ in range(clients)]
        tasks += [sse_watcher(url, token, watch, stop_at, sse_counts) for _ in range(sse)]
        tasks += [sim_worker(url, worker_token, f"bench-worker-{i}", stop_at, claims, statuses)
                  for i in range(workers)]
        await asyncio.gather(*tasks)
    return latencies, statuses, sse_counts, claims


async def prefill_api(url: str, token: str, body: dict, count: int) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        sem = asyncio.Semaphore(20)

        async def one() -> None:
            async with sem:
                (await http.post("/api/jobs", json=body)).raise_for_status()

        await asyncio.gather(*(one() for _ in range(count)))


def _quantiles_ms(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000) if ordered else (lambda q: 0.0)
    return f"p50 {p(0.50):.1f}  p99 {p(0.99):.1f}  max {p(1.0):.1f}"


def report(latencies: list[tuple[str, float]], statuses: Counter, elapsed_s: float, clients: int) -> int:
    server_errors = sum(n for code, n in statuses.items() if isinstance(code, int) and code >= 500)
    failures = sum(n for code, n in statuses.items() if not isinstance(code, int))
    seconds = [s for _, s in latencies]
    print(f"clients: {clients}  duration: {elapsed_s:.1f} s  requests: {len(latencies)}")
    print(f"requests/s: {len(latencies) / elapsed_s:.1f}")
    print(f"latency ms: {_quantiles_ms(seconds)}  mean {statistics.fmean(seconds) * 1000 if seconds else 0:.1f}")
    for kind in sorted({k for k, _ in latencies}):   # which call the slow ones are
        print(f"  {kind:<22} {_quantiles_ms([s for k, s in latencies if k == kind])}")
    print(f"status: {dict(sorted(statuses.items(), key=str))}")
    print(f"5xx: {server_errors}  connection errors: {failures}")
    return 1 if server_errors or failures else 0


def report_extras(sse_counts: Counter, claims: Counter, workers: int) -> int:
    bad = 0
    if sse_counts:
        sse_errors = sum(n for k, n in sse_counts.items() if k not in ("sse streams", "sse events"))
        print(f"sse: streams {sse_counts['sse streams']}  events {sse_counts['sse events']}  errors {sse_errors}"
              f"  {dict(sse_counts)}")
        bad |= sse_errors > 0
    if workers:
        per_worker = [claims.get(f"bench-worker-{i}", 0) for i in range(workers)]
        mean = sum(per_worker) / workers
        spread = (max(per_worker) - min(per_worker)) / mean if mean else float("inf")
        print(f"claims per worker: {per_worker}  total {sum(per_worker)}  max-min spread {spread:.0%} of the mean")
        bad |= sum(per_worker) == 0
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="A running server; default: start one on a temp data dir.")
    parser.add_argument("--token", help="User token of --url's server.")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds.")
    parser.add_argument("--data-path", default="datasets/bench.jsonl")
    parser.add_argument("--base-model", default="models/bench-model")
    parser.add_argument("--prefill", type=int, default=0, help="Queued jobs created before the load.")
    parser.add_argument("--sse", type=int, default=0, help="SSE watchers on queued jobs.")
    parser.add_argument("--workers", type=int, default=0, help="Simulated workers claiming and finishing jobs.")
    parser.add_argument("--worker-token", help="Worker token of --url's server (for --workers).")
    args = parser.parse_args(argv)
    body = {"config": {"base_model": args.base_model, "data_path": args.data_path, "max_steps": 1}, "gpus": 0}
    with tempfile.TemporaryDirectory(prefix="paratrain-bench-") as tmp:
        server = None
        url, token = args.url, args.token
        worker_token = args.worker_token or ""
        if url is None:
            server, url, token = start_server(Path(tmp))
            worker_token = (Path(tmp) / "worker_token").read_text().strip()
            if args.prefill:
                print(f"prefill: {args.prefill} queued jobs in {prefill_db(Path(tmp), args.prefill, body):.1f} s")
        elif args.prefill:
            asyncio.run(prefill_api(url, token, body, args.prefill))
        if not token:
            parser.error("--token is required with --url")
        if args.workers and not worker_token:
            parser.error("--worker-token is required with --url and --workers")
        try:
            rss_before = rss_mb(server.pid) if server is not None else None
            t0 = time.monotonic()
            latencies, statuses, sse_counts, claims = asyncio.run(run_load(
                url, token, body, args.clients, args.duration, sse=args.sse, workers=args.workers,
                worker_token=worker_token))
            code = report(latencies, statuses, time.monotonic() - t0, args.clients)
            code |= report_extras(sse_counts, claims, args.workers)
            if server is not None:
                print(f"server RSS MB: before {rss_before:.0f}  after {rss_mb(server.pid):.0f}")
            return code
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
