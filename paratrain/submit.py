"""`paratrain submit JOB.yaml [--follow]`: queue a saved job (the UI's *Save as YAML*, or any YAML/JSON of
TrainConfig fields with an optional `job:` section) on a server, and optionally follow it to its end.

The file is checked here first, by the same rules as the UI's *Load YAML* (line, key or field named); the
server then checks the paths (under its data root; relative ones start there). `--follow` reads the job's
SSE stream (docs/API.md) and prints its state changes and metrics; it reconnects where it left off
(`Last-Event-ID`), and Ctrl-C stops following, not the job.

Exit codes: 0 queued (with --follow: succeeded); 1 the job failed or was cancelled, or the server could not
be reached; 2 a bad file, flag or token, or a job the server refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_SERVER = "http://127.0.0.1:8000"   # `paratrain serve`'s default
FINAL_STATES = ("succeeded", "failed", "cancelled")
RECONNECT_TRIES = 30
RECONNECT_WAIT_S = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="The job: YAML or JSON of TrainConfig fields, JobResources "
                                                "fields under `job:` (the UI's Save as YAML writes one).")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"The server's URL (default: {DEFAULT_SERVER}).")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="File holding the user token (default: $PARATRAIN_USER_TOKEN, else "
                             "$PARATRAIN_DATA_DIR/token, else .paratrain/token: what `paratrain serve` creates).")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="Print the job's progress until it ends; exit 0 only if it succeeded.")


def run(args: argparse.Namespace) -> int:
    from ui.api import ApiClient, ApiError

    try:
        body = job_body(args.file.read_text(encoding="utf-8"))
    except OSError as e:
        return _fail(f"{args.file}: {e.strerror or e}")
    except ValueError as e:
        return _fail(f"{args.file}: {e}")
    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    server = args.server.rstrip("/")
    try:
        job = ApiClient(server, token).submit_job(body)
    except ApiError as e:
        if e.status == 0:
            print(f"paratrain submit: {e}", file=sys.stderr)
            return EXIT_FAILED
        if e.status == 401:
            return _fail(f"the server at {server} did not accept the token (give --token-file, or set "
                         "PARATRAIN_USER_TOKEN)")
        return _fail(f"the server refused the job: {e}")
    print(f"job {job['id']} queued ({job['name']}): {server}/ui, or {server}/api/jobs/{job['id']}", flush=True)
    if not args.follow:
        return 0
    try:
        return follow(server, token, job["id"])
    except FollowError as e:
        print(f"paratrain submit: {e}; job {job['id']} may go on", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job['id']} goes on (cancel it in the UI or with "
              f"POST {server}/api/jobs/{job['id']}/cancel)", file=sys.stderr)
        return EXIT_INTERRUPTED


class FollowError(Exception):
    """The job's event stream cannot be read (refused, or the server gone for good)."""


def job_body(text: str) -> dict[str, Any]:
    """The JobCreate body of docs/API.md from a job file."""
    from trainer_core.config import parse_job_file

    config, job = parse_job_file(text)
    missing = [name for name in ("base_model", "data_path") if name not in config]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)}")
    return {"config": config, **job}


def read_token(token_file: Path | None) -> str:
    if token_file is None:
        if os.environ.get("PARATRAIN_USER_TOKEN"):
            return os.environ["PARATRAIN_USER_TOKEN"]
        token_file = Path(os.environ.get("PARATRAIN_DATA_DIR", ".paratrain")) / "token"
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise OSError(f"cannot read the user token from {token_file}: {e.strerror or e} (give --token-file, or "
                      "set PARATRAIN_USER_TOKEN)") from None
    if not token:
        raise ValueError(f"{token_file} is empty")
    return token


def follow(server: str, token: str, job_id: int) -> int:
    """Print the job's state changes and metrics until its stream ends; the exit code of its final state."""
    from ui.api import ApiClient

    api = ApiClient(server, token)
    state, total_steps = None, None
    for event, data in job_events(server, token, job_id):
        if event == "state" and data["state"] != state and data["state"] not in FINAL_STATES:
            state = data["state"]
            print(f"{state} (attempt {data['attempt']})", flush=True)
        elif event == "metric":
            # the trainer's first metric comes after its start event, which set the job's total
            total_steps = total_steps or data.get("total_steps") or api.get_job(job_id).get("total_steps")
            print(metric_line(data, total_steps), flush=True)
        elif event == "end":
            return _final(api, job_id, data["state"])
    return EXIT_FAILED


def metric_line(m: dict[str, Any], total_steps: int | None) -> str:
    parts = [f"step {m['step']}" + (f"/{total_steps}" if total_steps else "")]
    if m.get("loss") is not None:
        parts.append(f"loss {m['loss']:.4f}")
    if m.get("lr") is not None:
        parts.append(f"lr {m['lr']:.2e}")
    if m.get("tokens_per_s"):
        parts.append(f"{m['tokens_per_s']:,.0f} tokens/s")
    if m.get("gpu_mem_gb"):
        parts.append(f"{m['gpu_mem_gb']:.1f} GiB")
    if m.get("eta_s") is not None:
        parts.append(f"eta {m['eta_s']:.0f} s")
    return "  ".join(parts)


def job_events(server: str, token: str, job_id: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of the job's SSE stream, reconnecting after the last event seen when the connection
    drops (the server replays exactly what followed it)."""
    last_id, tries = 0, 0
    while True:
        try:
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(last_id)}
            with httpx.stream("GET", f"{server}/api/jobs/{job_id}/events", headers=headers,
                              timeout=httpx.Timeout(10.0, read=None)) as response:
                if response.status_code != 200:
                    detail = response.read().decode(errors="replace")[:300]
                    raise FollowError(f"its event stream answered {response.status_code}: {detail}")
                tries = 0
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line:
                        key, _, value = line.partition(":")
                        fields[key] = value.removeprefix(" ")
                        continue
                    if "id" in fields:
                        last_id = int(fields["id"])
                    if "data" in fields:
                        yield fields.get("event", "message"), json.loads(fields["data"])
                        if fields.get("event") == "end":
                            return
                    fields = {}
        except httpx.TransportError as e:
            tries += 1
            if tries > RECONNECT_TRIES:
                raise FollowError(f"lost the server ({e})") from None
            print(f"(connection lost: {e}; reconnecting)", file=sys.stderr, flush=True)
            time.sleep(RECONNECT_WAIT_S)


def _final(api, job_id: int, state: str) -> int:  # type: ignore[no-untyped-def]
    from ui.api import ApiError

    try:
        job = api.get_job(job_id)
    except ApiError:   # deleted meanwhile ("end" then says so), or the server went away
        job = {}
    if state != "succeeded":
        why = f" ({job['failure_class']}): {job['failure_reason']}" if job.get("failure_reason") else ""
        print(f"job {job_id} {state}{why}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    where = job.get("config", {}).get("output_dir", "its output dir")
    print(f"job {job_id} succeeded; outputs in {where} (the server's file system; also "
          f"{api.base_url}/api/jobs/{job_id}/artifacts)", flush=True)
    return 0


def _fail(message: str) -> int:
    print(f"paratrain submit: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
