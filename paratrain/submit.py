"""`paratrain submit JOB.yaml [--follow]`: queue a saved job (the UI's *Save as YAML*, or any YAML/JSON of
TrainConfig fields with an optional `job:` section) on a server, and optionally follow it to its end.

The file is checked here first, by the same rules as the UI's *Load YAML* (line, key or field named); the
server then checks the paths (under its data root; relative ones start there). `--follow` reads the job's
SSE stream (docs/API.md) and prints its state changes and metrics; it reconnects where it left off
(`Last-Event-ID`), and Ctrl-C stops following, not the job.

Exit codes: 0 queued (with --follow: succeeded); 1 the job failed or was cancelled, or the server could not
be reached or failed; 2 a bad file, flag or token, or a job the server refused; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from server.settings import SERVER_URL_FILE

if TYPE_CHECKING:
    from ui.api import ApiClient

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_SERVER = "http://127.0.0.1:8000"   # `paratrain serve`'s default
SUBMIT_TIMEOUT_S = 60.0    # a busy SQLite queue can take seconds to commit; a timed-out POST may still land
FINAL_STATES = ("succeeded", "failed", "cancelled")
RECONNECTS_WITHOUT_PROGRESS = 30
RECONNECT_WAIT_S = 2.0
STREAM_READ_TIMEOUT_S = 60.0   # the server pings every 15 s: silence this long is a dead connection
TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)


def server_url(text: str) -> str:
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as e:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r} ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r} (e.g. {DEFAULT_SERVER})")
    return text.rstrip("/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="The job: YAML or JSON of TrainConfig fields, JobResources "
                                                "fields under `job:` (the UI's Save as YAML writes one).")
    add_connection_arguments(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Change one field of the file (job.KEY for a job field; the value is read as YAML: "
                             "--set learning_rate=3e-4 --set job.gpus=2). Repeatable: one file, a sweep.")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="Print the job's progress until it ends; exit 0 only if it succeeded.")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--server and --token-file, as `paratrain submit` and `paratrain jobs` take them."""
    parser.add_argument("--server", type=server_url, default=None,
                        help=f"The server's URL (default: $PARATRAIN_SERVER, else the URL `paratrain serve` wrote in "
                             f"$PARATRAIN_DATA_DIR/{SERVER_URL_FILE} (else .paratrain/{SERVER_URL_FILE}), else "
                             f"{DEFAULT_SERVER}).")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="File holding the user token (default: $PARATRAIN_USER_TOKEN, else "
                             "$PARATRAIN_DATA_DIR/token, else .paratrain/token: what `paratrain serve` creates).")


def connect(args: argparse.Namespace, timeout_s: float | None = None) -> tuple[ApiClient, str]:
    """The API client of --server/--token-file (or their defaults) and its token; ValueError or OSError with a
    message for the user."""
    from ui.api import ApiClient

    token = read_token(args.token_file)
    args.server = args.server or default_server()
    return ApiClient(args.server, token, **({"timeout_s": timeout_s} if timeout_s else {})), token


def run(args: argparse.Namespace) -> int:
    from ui.api import ApiError
    from ui.workers import capacity_warning, known_workers

    try:
        body = job_body(args.file.read_text(encoding="utf-8"), args.overrides)
    except OSError as e:
        return _fail(f"{args.file}: {e.strerror or e}")
    except (ValueError, UnicodeDecodeError) as e:   # a --set's own mistake is not the file's
        return _fail(str(e) if str(e).startswith("--set ") else f"{args.file}: {e}")
    try:
        api, token = connect(args, timeout_s=SUBMIT_TIMEOUT_S)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    maybe_queued = f"the job may have been queued: see {args.server}/api/jobs or the UI"
    try:
        job = api.submit_job(body)
    except KeyboardInterrupt:
        print(f"\ninterrupted before the server answered; {maybe_queued}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ApiError as e:
        if e.status == 0 and isinstance(e.__cause__, httpx.ReadTimeout):
            print(f"paratrain submit: no answer within {SUBMIT_TIMEOUT_S:.0f} s; {maybe_queued}", file=sys.stderr)
            return EXIT_FAILED
        if e.status == 0 or e.status >= 500:
            # nothing listens there: most often a server started with another --port
            hint = (" Is `paratrain serve` running there? Give its address with --server URL."
                    if isinstance(e.__cause__, httpx.ConnectError) else "")
            print(f"paratrain submit: {e}{hint}", file=sys.stderr)
            return EXIT_FAILED
        if e.status == 401:
            return _fail(f"the server at {args.server} did not accept the token (give --token-file, or set "
                         "PARATRAIN_USER_TOKEN)")
        return _fail(f"the server refused the job: {e}")
    print(f"job {job['id']} queued ({job['name']}): {args.server}/ui, or {args.server}/api/jobs/{job['id']}",
          flush=True)
    workers = known_workers(api)
    warning = workers is not None and capacity_warning(workers, job["gpus"], job["nodes"])
    if warning:
        print(f"paratrain submit: {warning}", file=sys.stderr, flush=True)
    if not args.follow:
        return 0
    try:
        return follow(api, token, job["id"])
    except FollowError as e:
        print(f"paratrain submit: {e}; job {job['id']} may go on", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job['id']} goes on (paratrain jobs cancel {job['id']} cancels it; "
              f"paratrain jobs follow {job['id']} follows it again)", file=sys.stderr)
        return EXIT_INTERRUPTED


class FollowError(Exception):
    """The job's event stream cannot be read (refused, unreadable, or the server gone for good)."""


def job_body(text: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The JobCreate body of docs/API.md from a job file and `key=value` overrides."""
    from trainer_core.config import parse_job_file

    config, job = parse_job_file(text, overrides or ())
    missing = [name for name in ("base_model", "data_path") if name not in config]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)}")
    return {"config": config, **job}


def default_server() -> str:
    """$PARATRAIN_SERVER, else the URL `paratrain serve` wrote in the data dir (as the token: a serve on another
    --port is found), else serve's default."""
    if os.environ.get("PARATRAIN_SERVER"):
        return _checked_url(os.environ["PARATRAIN_SERVER"], "PARATRAIN_SERVER")
    written = Path(os.environ.get("PARATRAIN_DATA_DIR", ".paratrain")) / SERVER_URL_FILE
    try:
        return _checked_url(written.read_text(encoding="utf-8").strip(), str(written))
    except FileNotFoundError:
        return DEFAULT_SERVER


def _checked_url(text: str, where: str) -> str:
    try:
        return server_url(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{where}: {e}") from None


def read_token(token_file: Path | None) -> str:
    if token_file is None:
        if os.environ.get("PARATRAIN_USER_TOKEN"):
            return _checked_token(os.environ["PARATRAIN_USER_TOKEN"].strip(), "PARATRAIN_USER_TOKEN")
        token_file = Path(os.environ.get("PARATRAIN_DATA_DIR", ".paratrain")) / "token"
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise OSError(f"cannot read the user token from {token_file}: {e.strerror or e} (give --token-file, set "
                      "PARATRAIN_USER_TOKEN, or PARATRAIN_DATA_DIR to serve's --data-dir)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{token_file} does not hold a token (not text)") from None
    return _checked_token(token, str(token_file))


def _checked_token(token: str, source: str) -> str:
    # an HTTP header takes printable ASCII only: anything else would end in an encoding traceback
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{source} does not hold a token (one word of printable ASCII)")
    return token


def follow(api: ApiClient, token: str, job_id: int) -> int:
    """Print the job's state changes and metrics until its stream ends; the exit code of its final state."""
    from ui.api import ApiError

    state, total_steps = None, None
    printed: dict[int, Any] = {}   # step -> losses: a resumed attempt re-sends the steps it brings back
    for event, data in sse_events(api.base_url, token, job_id):
        if event == "state" and data["state"] != state and data["state"] not in FINAL_STATES:
            state = data["state"]
            print(f"{state} (attempt {data['attempt']})", flush=True)
        elif event == "metric" and printed.get(data["step"]) != (data.get("loss"), data.get("val_loss")):
            if total_steps is None:   # the job's total is known once the trainer's start event has come
                try:
                    total_steps = api.get_job(job_id).get("total_steps")
                except ApiError:
                    pass
            printed[data["step"]] = (data.get("loss"), data.get("val_loss"))
            print(metric_line(data, total_steps), flush=True)
        elif event == "end":
            return _final(api, job_id, data["state"])
    raise FollowError("the event stream ended without the job's end")


def metric_line(m: dict[str, Any], total_steps: int | None) -> str:
    parts = [f"step {m['step']}" + (f"/{total_steps}" if total_steps else "")]
    if m.get("loss") is not None:
        parts.append(f"loss {m['loss']:.4f}")
    if m.get("val_loss") is not None:
        parts.append(f"val loss {m['val_loss']:.4f}")
    if m.get("lr") is not None:
        parts.append(f"lr {m['lr']:.2e}")
    if m.get("tokens_per_s"):
        parts.append(f"{m['tokens_per_s']:,.0f} tokens/s")
    if m.get("gpu_mem_gb"):
        parts.append(f"{m['gpu_mem_gb']:.1f} GiB")
    if m.get("eta_s") is not None:
        parts.append(f"eta {m['eta_s']:.0f} s")
    return "  ".join(parts)


def sse_events(server: str, token: str, job_id: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of the job's SSE stream. A dropped connection, a stream that closes early, or a
    transient status (a proxy while the server restarts) is retried from the last event seen (the server
    replays exactly what followed it), up to RECONNECTS_WITHOUT_PROGRESS times in a row without a new event."""
    last_id, idle_reconnects = 0, 0
    while True:
        problem = "the stream closed"
        try:
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": str(last_id)}
            timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT_S)
            with httpx.stream("GET", f"{server}/api/jobs/{job_id}/events", headers=headers,
                              timeout=timeout) as response:
                if response.status_code != 200:
                    detail = f"its event stream answered {response.status_code}: " \
                             f"{response.read().decode(errors='replace')[:300]}"
                    if response.status_code not in TRANSIENT_STATUSES:
                        raise FollowError(detail)
                    problem = detail
                else:
                    for event_id, event, data in _parse_sse(response.iter_lines()):
                        idle_reconnects = 0
                        last_id = event_id if event_id is not None else last_id
                        yield event, data
                        if event == "end":
                            return
        except httpx.TransportError as e:
            problem = f"connection lost: {e}"
        idle_reconnects += 1
        if idle_reconnects > RECONNECTS_WITHOUT_PROGRESS:
            raise FollowError(f"gave up after {RECONNECTS_WITHOUT_PROGRESS} tries ({problem})")
        print(f"({problem}; reconnecting)", file=sys.stderr, flush=True)
        time.sleep(RECONNECT_WAIT_S)


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[int | None, str, dict[str, Any]]]:
    """(id, event, JSON data) per event of a text/event-stream; comments (the server's pings) are skipped."""
    event_id, event, data = None, "message", []
    for line in lines:
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "data":
                data.append(value)   # several data lines are one text, joined by newlines
            elif key == "event":
                event = value
            elif key == "id":
                event_id = int(value) if value.isdigit() else None
            continue
        if data:
            try:
                payload = json.loads("\n".join(data))
            except ValueError as e:
                raise FollowError(f"an unreadable {event!r} event ({e})") from None
            if not isinstance(payload, dict):
                raise FollowError(f"an unreadable {event!r} event (not a JSON object)")
            yield event_id, event, payload
        event_id, event, data = None, "message", []


def _final(api: ApiClient, job_id: int, state: str) -> int:
    from ui.api import ApiError, improvement_text, stopped_early

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
    if stopped_early(job):
        print(f"stopped early at step {job['step']} of {job['total_steps']}: {job['config']['early_stop_patience']} "
              f"validations in a row without {improvement_text(job['config'])}", flush=True)
    if job.get("last_val_loss") is not None:
        from trainer_core.config import BEST_ADAPTER_DIR

        try:   # the trainer's record of it: the lowest may have been before training (an untrained adapter)
            best = json.loads(api.download_artifact(job_id, f"{BEST_ADAPTER_DIR}/validation.json"))
        except (ApiError, ValueError):
            best = {}
        before = " (before training: the adapter it started from)" if best.get("step") == 0 else ""
        print(f"the adapter of the lowest validation loss: {where}/{BEST_ADAPTER_DIR}/{before}", flush=True)
    return 0


def _fail(message: str) -> int:
    print(f"paratrain submit: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
