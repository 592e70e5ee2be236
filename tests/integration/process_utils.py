"""Helpers of the real-process tests (a uniquely named module: every test dir has a conftest.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
FAST_LEASES = {"PARATRAIN_HEARTBEAT_INTERVAL_S": "0.5", "PARATRAIN_LEASE_TTL_S": "3",
               "PARATRAIN_REAPER_INTERVAL_S": "0.2", "PARATRAIN_SSE_POLL_S": "0.1", "PARATRAIN_MOUNT_UI": "false"}
# Small steps on CPU: a few hundred ms each with the tiny model.
TINY_CONFIG = {"base_model": "models/tiny-qwen2", "data_path": "datasets/demo.jsonl", "max_seq_len": 64,
               "batch_size": 4, "save_interval": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def wait_until_healthy(url: str, alive, timeout: float = 60.0, log_path: Path | None = None) -> None:
    """Poll GET /api/health until it answers 200; fail early if `alive()` turns false (the server died)."""
    import time

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        detail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
        assert alive(), f"the server exited during start-up\n{detail}"
        assert time.time() < deadline, f"the server did not answer /api/health within {timeout:.0f} s\n{detail}"
        time.sleep(0.1)


def pids_of(output_dir: str) -> list[int]:
    """Processes whose command line names the job's output dir: torchrun and its ranks."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if output_dir in cmdline:
                pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie runs nothing; only its exit status is left


def read_sse(url: str, token: str, *, last_event_id: int = 0, max_events: int | None = None,
             timeout: float = 180) -> list[dict]:
    """Events of one SSE connection: [{id, event, data}], stopping after max_events (a disconnect)."""
    events: list[dict] = []
    headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(last_event_id)}
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        current: dict = {}
        for line in r.iter_lines():
            if line.startswith(":"):
                continue
            if not line:
                if current.get("event") == "end":     # the stream's last word: the job has ended
                    return events
                if "data" in current:
                    events.append({"id": int(current["id"]), "event": current["event"],
                                   "data": json.loads(current["data"])})
                    if max_events is not None and len(events) >= max_events:
                        return events
                current = {}
                continue
            key, _, value = line.partition(": ")
            current[key] = value
    return events
