"""Workers tab: the machines that run jobs (GET /api/workers every 5 s): their GPUs, whether they are
online, stopping (a warm stop: no new jobs) or offline, what they run and when they last checked in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import gradio as gr

from ui.api import ApiError
from ui.context import UiContext, fmt_duration, parse_api_time
from ui.workers import Worker

COLUMNS = ["worker", "host", "state", "GPUs", "running jobs", "last heartbeat"]
STATE_ICONS = {"online": "●", "stopping": "◐", "offline": "○"}


@dataclass
class WorkersTab:
    table: gr.Dataframe
    info: gr.Markdown
    timer: gr.Timer
    refresh_fn: Any = None  # (session) -> (table, info): also run when the tab is opened


def worker_state(worker: Worker) -> str:
    if not worker.get("online"):
        return "offline"
    return "stopping" if worker.get("stopping") else "online"


def gpus_text(worker: Worker) -> str:
    """'2 × NVIDIA H100 80GB HBM3 (79.6 GB)' for identical GPUs, one entry per kind otherwise; 'CPU only'."""
    kinds: dict[str, int] = {}
    for gpu in worker.get("gpus") or []:
        size = f" ({gpu['memory_gb']:.1f} GB)" if gpu.get("memory_gb") else ""
        kind = f"{gpu.get('name') or 'GPU'}{size}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{n} × {kind}" for kind, n in kinds.items()) or "CPU only"


def seconds_ago(timestamp: str | None, now: datetime) -> float | None:
    then = parse_api_time(timestamp)
    return None if then is None else (now - then).total_seconds()


def ago_text(seconds: float | None) -> str:
    """`12 s ago` under a minute (a heartbeat is seconds old: `0:00 ago` read as nothing), else `2:30 ago`."""
    if seconds is None:
        return ""
    return f"{int(max(seconds, 0))} s ago" if seconds < 60 else f"{fmt_duration(seconds)} ago"


def table_rows(workers: list[Worker], now: datetime) -> list[list[Any]]:
    """Online workers first, then by name."""
    order = {"online": 0, "stopping": 1, "offline": 2}
    rows = []
    for w in sorted(workers, key=lambda w: (order[worker_state(w)], w["name"])):
        state = worker_state(w)
        ago = seconds_ago(w.get("last_heartbeat_at"), now)
        rows.append([w["name"], w.get("hostname") or "", f"{STATE_ICONS[state]} {state}", gpus_text(w),
                     ", ".join(f"#{j}" for j in w.get("running_job_ids") or []),
                     ago_text(ago)])
    return rows


def summary_text(workers: list[Worker]) -> str:
    online = [w for w in workers if w.get("online")]
    gpus = sum(len(w.get("gpus") or []) for w in online)
    if not workers:
        return "No worker has registered yet: start one with `paratrain worker --server URL --token-file F` " \
               "(docs/DEPLOY.md)."
    return (f"{len(online)} of {len(workers)} worker{'s' if len(workers) != 1 else ''} online, "
            f"{gpus} GPU{'s' if gpus != 1 else ''} among them. A stopping worker takes no new jobs and leaves "
            "when its running ones end.")


def create_workers_tab(ctx: UiContext) -> WorkersTab:
    info = gr.Markdown(elem_id="workers-info")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, label="Workers", elem_id="workers-table")
    timer = gr.Timer(5.0)

    def refresh(session):
        if not (session or {}).get("token"):
            return gr.skip(), gr.skip()
        try:
            workers = ctx.client(session).workers()
        except ApiError as e:
            return gr.skip(), f"Cannot list the workers: {e}"
        return table_rows(workers, datetime.now(timezone.utc)), summary_text(workers)

    timer.tick(refresh, ctx.session, [table, info], show_progress="hidden")
    return WorkersTab(table, info, timer, refresh)
