"""How a job reads as text, for the UI's Jobs and Compare tabs and for `paratrain jobs`: its state and
progress in a word or two, and its log for people. No Gradio here: the command line imports it."""

from __future__ import annotations

import re
from typing import Any

from trainer_core import exit_codes
from ui.api import stopped_early

def fmt_number(value: float | None, digits: int = 0) -> str:
    """'1,234' / '7.1000' (`digits` decimals); '' for no value."""
    return "" if value is None else f"{value:,.{digits}f}"


STATE_ICONS = {"queued": "…", "running": "▶", "succeeded": "✔", "failed": "✖", "cancelled": "■"}


def progress_text(job: dict[str, Any]) -> str:
    step, total = job.get("step") or 0, job.get("total_steps")
    if total:
        return f"{step}/{total} ({'stopped early' if stopped_early(job) else f'{step / total:.0%}'})"
    return str(step) if step else ""


def failure_kind(job: dict[str, Any]) -> str | None:
    """The failure class, or 'diverged' for a divergence (exit 4), which the server classes as data."""
    return "diverged" if job.get("exit_code") == exit_codes.DIVERGED else job.get("failure_class")


def state_words(job: dict[str, Any]) -> str:
    """'failed (oom)': a failed job says why at a glance (data, oom, diverged, crash, lost)."""
    why = failure_kind(job)
    return job["state"] + (f" ({why})" if job["state"] == "failed" and why else "")


def state_text(job: dict[str, Any]) -> str:
    """state_words with the state's icon: '✖ failed (oom)'."""
    return f"{STATE_ICONS.get(job['state'], '')} {state_words(job)}"


# torchrun's report of a failed rank: its own traceback and a summary between two ===== lines, some 30 lines
# that followed the trainer's error and pushed it out of the log box
TORCHRUN_FAILED = re.compile(r"torch/distributed/elastic/\S+\] failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
REPORT_FENCE = "=" * 20
MAX_REPORT_LINES = 80   # a report cut short (torchrun killed) ends here at the latest


def readable_lines(lines: list[str]) -> list[str]:
    """The log without the trainer's JSON lines (metrics and events, `[node K] ` prefixed or not): the curves
    show those, and each step also has its human line. torchrun's failure report is one line here (the API's
    log keeps it whole): a node's report ends at its closing fence, at the worker's next `[paratrain]` line (a
    report cut short) or after MAX_REPORT_LINES; another node's lines go on showing meanwhile."""
    shown: list[str] = []
    reports: dict[str, dict[str, Any]] = {}   # by node prefix: the torchrun report being passed over
    for line in lines:
        prefix, text = re.match(r"(\[node \d+\] )?(.*)", line, re.S).groups()
        prefix = prefix or ""
        if text.startswith("{"):
            continue
        report = reports.get(prefix)
        if report is not None and (text.startswith("[paratrain]") or report["lines"] == MAX_REPORT_LINES):
            del reports[prefix]   # cut short: this line is the worker's, or the trainer's again
            report = None
        failed = TORCHRUN_FAILED.search(text) if report is None else None
        if failed:
            says = f"{prefix}[torchrun: local rank {failed[2]} exited with code {failed[1]}"
            report = reports[prefix] = {"at": len(shown), "lines": 0, "fences": 0, "says": says}
            shown.append("")
        if report is None:
            shown.append(line)
            continue
        report["lines"] += 1
        report["fences"] += text.startswith(REPORT_FENCE)
        shown[report["at"]] = f"{report['says']}; its report of {report['lines']} lines is not shown]"
        if report["fences"] == 2:   # the summary's closing fence
            del reports[prefix]
    return shown
