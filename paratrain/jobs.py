"""`paratrain jobs [list|show|logs|follow|cancel|retry] [ID]`: the UI's Jobs tab in a terminal (over SSH, in a
script), on the server `paratrain submit` finds (--server, --token-file, or their defaults).

Exit codes: 0 done (follow: the job succeeded); 1 the server could not be reached or failed (follow: the job
failed or was cancelled); 2 a bad token, an unknown job, or an action the job's state refuses (the server's 409).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from paratrain.submit import EXIT_BAD_INPUT, EXIT_FAILED, FollowError, add_connection_arguments, connect, follow

if TYPE_CHECKING:
    from ui.api import ApiClient

ACTIONS = ("list", "show", "logs", "follow", "cancel", "retry")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
SHOW_LOG_LINES = 15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=ACTIONS,
                        help="list (the default): the newest jobs, a line each; show ID: its summary and its log's "
                             "last lines; logs ID: its log; follow ID: its progress until it ends; cancel ID; "
                             "retry ID (a failed or cancelled job, from its last checkpoint).")
    parser.add_argument("job_id", nargs="?", type=int, metavar="ID", help="The job (all but list).")
    parser.add_argument("--state", choices=STATES, help="list: only the jobs in this state.")
    parser.add_argument("--limit", type=int, default=20, help="list: this many of the newest jobs (default 20).")
    parser.add_argument("--tail", type=int, default=None, metavar="N",
                        help=f"logs: only the last N lines (default: all); show: N lines (default {SHOW_LOG_LINES}).")
    parser.add_argument("--raw", action="store_true",
                        help="logs: every line as stored, the trainer's JSON lines and torchrun's reports too.")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ui.api import ApiError

    if args.action != "list" and args.job_id is None:
        return _fail(f"{args.action} needs a job ID (paratrain jobs lists them)")
    if args.action == "list" and args.job_id is not None:
        return _fail(f"list takes no job ID: paratrain jobs show {args.job_id}")
    if args.limit < 1:
        return _fail("--limit takes a count of at least 1")
    if args.tail is not None and args.tail < 1:
        return _fail("--tail takes a count of at least 1")
    try:
        api, token = connect(args)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    try:
        if args.action == "list":
            print(jobs_table(api.list_jobs(state=args.state, limit=args.limit)))
        elif args.action == "show":
            job = api.get_job(args.job_id)
            print(job_text(job, api.best_adapter(args.job_id)))
            lines = log_lines(api, args.job_id)[-(args.tail or SHOW_LOG_LINES):]
            print("\nlog (last lines; paratrain jobs logs for all):" if lines else "\nno log lines yet", *lines,
                  sep="\n")
        elif args.action == "logs":
            lines = log_lines(api, args.job_id, raw=args.raw)
            print(*(lines[-args.tail:] if args.tail else lines), sep="\n")
        elif args.action == "follow":
            return follow(api, token, args.job_id)
        elif args.action == "cancel":
            job = api.cancel_job(args.job_id)
            print(f"job {job['id']}: " + ("cancel requested (it saves a checkpoint and stops)"
                                          if job["state"] == "running" else job["state"]))
        elif args.action == "retry":
            job = api.retry_job(args.job_id)
            # the server linked the original's checkpoints into the retry's output dir, if it saved any
            resumes = any(a["path"].startswith("checkpoints/step_") for a in api.artifacts(job["id"]))
            print(f"job {job['id']} queued, a retry of job {args.job_id} (" + (
                f"it resumes from job {args.job_id}'s last checkpoint" if resumes else
                f"job {args.job_id} saved no checkpoint: it starts from step 0") + f"); paratrain jobs follow {job['id']}")
    except ApiError as e:
        if e.status == 0 or e.status >= 500:
            print(f"paratrain jobs: {e}", file=sys.stderr)
            return EXIT_FAILED
        return _fail(str(e) if e.status != 404 else f"no job {args.job_id} on {args.server}")
    except FollowError as e:
        print(f"paratrain jobs: {e}; job {args.job_id} may go on", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nstopped following; job {args.job_id} goes on", file=sys.stderr)
        return 130
    return 0


def jobs_table(jobs: list[dict[str, Any]]) -> str:
    """The jobs as the UI's table shows them, in aligned columns."""
    from ui.jobtext import fmt_number, progress_text, state_words

    if not jobs:
        return "no jobs"
    rows = [["id", "name", "state", "progress", "loss", "val loss", "tokens/s", "GPUs"]]
    for job in jobs:
        rows.append([str(job["id"]), job.get("name") or "", state_words(job), progress_text(job),
                     fmt_number(job.get("last_loss"), 4), fmt_number(job.get("last_val_loss"), 4),
                     fmt_number(job.get("tokens_per_s"), 0), str(job.get("gpus") or "CPU")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def job_text(job: dict[str, Any], best: tuple[int, float] | None = None) -> str:
    """A job's summary: what it trains, where it is, where its outputs are (`best`: the step and loss of its
    adapter of the lowest validation loss, ApiClient.best_adapter), and why it failed."""
    from trainer_core.config import BEST_ADAPTER_DIR
    from ui.jobtext import fmt_number, progress_text, state_words

    cfg = job.get("config", {})
    lines = [f"job {job['id']} {job.get('name') or ''}: {state_words(job)}"
             + (f", {progress_text(job)}" if progress_text(job) else "")
             + f", attempt {job.get('attempt', 1)}/{job.get('max_attempts') or '?'}",
             f"model {cfg.get('base_model', '')}; data {cfg.get('data_path', '')}"
             + (f"; LoRA from {cfg['init_adapter']}" if cfg.get("init_adapter") else "")]
    if job.get("last_loss") is not None or job.get("last_val_loss") is not None:
        lines.append(f"loss {fmt_number(job.get('last_loss'), 4) or '-'}; validation loss "
                     f"{fmt_number(job.get('last_val_loss'), 4) or '-'}")
    if cfg.get("output_dir"):
        lines.append(f"outputs {cfg['output_dir']}")
        if best is not None:
            lines.append(f"lowest validation loss {fmt_number(best[1], 4)} at step {best[0]}: "
                         f"{cfg['output_dir']}/{BEST_ADAPTER_DIR}/")
    if job.get("retry_of"):
        lines.append(f"a retry of job {job['retry_of']}")
    if job.get("retried_as"):
        lines.append(f"retried as job {job['retried_as']}")
    if job.get("failure_reason"):
        lines += [f"{job.get('failure_class') or 'ended'}:", *("  " + ln for ln in job["failure_reason"].splitlines())]
    return "\n".join(lines)


def log_lines(api: ApiClient, job_id: int, raw: bool = False) -> list[str]:
    """All of a job's log lines, page by page; for people (ui.jobtext.readable_lines) unless `raw`."""
    from ui.jobtext import readable_lines

    lines: list[str] = []
    offset = 0
    while True:
        page = api.logs(job_id, offset=offset, limit=1000)
        lines += [entry["line"] for entry in page["data"]]
        if len(page["data"]) < 1000:
            break
        offset = page["next_offset"]
    return lines if raw else readable_lines(lines)


def _fail(message: str) -> int:
    print(f"paratrain jobs: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
