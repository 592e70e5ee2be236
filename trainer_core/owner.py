"""Which run writes an output directory: the last one to start on it.

A run claims its output dir before it picks the checkpoint to resume (`claim`), and checks at every step,
before it writes anything, that the claim is still its own (`holds`). A run that finds another's claim stops
without writing more. Two runs on one directory would otherwise interleave their checkpoints and metrics:
a user who starts the same command twice, or a job's next attempt started by another worker while a worker
cut off from the server (but not from the shared files) still trains the previous one (docs/DEPLOY.md).

The claim is one small JSON file replaced atomically, so a reader sees either the old claim or the new one;
a claim is a random token, so every start is told apart (the same job attempt launched twice, too).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

OWNER_FILE = ".owner.json"
RUN_LABEL_ENV = "PARATRAIN_RUN"   # set by the worker: "<worker name>/<job id>/<attempt>"


def owner_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / OWNER_FILE


def claim(output_dir: str | Path) -> str:
    """Make this run the output dir's writer; returns the token `holds` checks."""
    token = uuid.uuid4().hex
    record = {"token": token, "run": os.environ.get(RUN_LABEL_ENV), "host": socket.gethostname(),
              "pid": os.getpid(), "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = owner_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{OWNER_FILE}.{token}.tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return token


def read_owner(output_dir: str | Path) -> dict | None:
    """The current claim, or None when there is none or it cannot be read."""
    try:
        record = json.loads(owner_path(output_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def holds(output_dir: str | Path, token: str) -> bool:
    """False only when another run has claimed the directory since: a claim file that is gone or unreadable
    (someone cleaned up by hand) does not stop a run."""
    record = read_owner(output_dir)
    return record is None or record.get("token") in (None, token)


def describe(record: dict | None) -> str:
    """`run 3/7/2 on host gpu-b (pid 4242) since ...`, for the message of the run that stops."""
    if record is None:
        return "another run"
    who = f"run {record['run']}" if record.get("run") else "another run"
    return (f"{who} on host {record.get('host', '?')} (pid {record.get('pid', '?')}) "
            f"since {record.get('claimed_at', '?')}")
