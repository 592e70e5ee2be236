"""One job's process tree: torchrun in its own session (process group), stdout/stderr pumped into
batches of metrics and log lines, stopped as a whole (SIGTERM, grace, SIGKILL).

torchrun starts each rank in a session of its own, so the launcher's process group does not hold the
ranks. Every process of a run therefore carries an environment marker (inherited by all descendants,
even ones re-parented after torchrun dies), and a stop signals the launcher's group plus every process
with the marker."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import psutil

from server.models import cut_log_line
from trainer_core import exit_codes
from trainer_core.owner import RUN_LABEL_ENV

LAUNCHED_BY_ENV = "PARATRAIN_LAUNCHED_BY"  # marks a worker's process trees, so its successor finds them
# marks one run's processes, "<worker name>/<job id>/<attempt>"; the trainer also writes it into its output
# dir's claim, which tells who took a job's output dir over
RUN_ENV = RUN_LABEL_ENV
STDERR_TAIL_LINES = 40
MAX_LOG_LINE_CHARS = 4000   # sent of one output line: the server's default max_log_line_chars
MAX_FAILURE_REASON_CHARS = 16_000
METRIC_KEYS = ("step", "loss")
# `python -m` puts the working directory first on sys.path: started from another checkout of paratrain, the
# worker, its launcher and the trainer ran that checkout's code (an older one failed every job with "cannot
# run the stored config"). With this set they do not (Python 3.11+; 3.10 ignores it); their children inherit it.
SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}
LEFTOVER_WAIT_S = 10.0   # for SIGKILLed leftovers of a run to be gone before its end is reported

# torchrun does not pass on its ranks' exit codes (it exits 1); its failure summary names them.
_TORCHRUN_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")


class StopReason(str, Enum):
    cancel = "cancel"  # the user cancelled: the job ends cancelled
    release = "release"  # the worker is stopping: the job goes back to the queue
    lost = "lost"  # the server gave the job to someone else: just stop


@dataclass
class Outcome:
    exit_code: int
    failure_class: str | None
    failure_reason: str | None
    release: bool = False

    def __post_init__(self) -> None:
        # the server takes 20,000 characters (a longer finish would be refused, and the real reason lost);
        # a traceback's end is what says why
        if self.failure_reason is not None and len(self.failure_reason) > MAX_FAILURE_REASON_CHARS:
            self.failure_reason = "[...]\n" + self.failure_reason[-MAX_FAILURE_REASON_CHARS:]


@dataclass
class Batch:
    metrics: list[dict[str, Any]]
    logs: list[str]
    log_start: int


def resolve_program(argv: list[str]) -> list[str]:
    """`torchrun`/`python` as this worker's environment has them (its venv may not be on PATH)."""
    program, rest = argv[0], argv[1:]
    if program == "python":
        return [sys.executable, *rest]
    if program == "torchrun":
        sibling = Path(sys.executable).with_name("torchrun")
        if sibling.exists():
            return [str(sibling), *rest]
        found = shutil.which("torchrun")
        return [found, *rest] if found else [sys.executable, "-m", "torch.distributed.run", *rest]
    return argv


@dataclass
class JobRun:
    job_id: int
    attempt: int
    gpu_ids: list[int]
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    stop_reason: StopReason | None = None
    kill_deadline: float | None = None
    pending_metrics: list[dict[str, Any]] = field(default_factory=list)
    pending_logs: list[str] = field(default_factory=list)
    logs_acked: int = 0  # this attempt's lines the server has stored
    stderr_tail: list[str] = field(default_factory=list)
    total_steps: int | None = None
    # Global rank 0 prints the "start" and "done" events; in a multi-node job it may run on any node, so
    # only the node that saw "start" can tell a finished run from one stopped half-way.
    training_started: bool = False
    training_done: bool = False  # the trainer printed its "done" event: the final weights are written
    failure_message: str | None = None   # the first `failed` event's: why the trainer exits with 2, 3 or 4
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pumps: list[threading.Thread] = field(default_factory=list)

    @property
    def marker(self) -> str:
        return self.env[RUN_ENV]

    @property
    def pgid(self) -> int:
        assert self.process is not None
        return self.process.pid  # start_new_session: the leader's pid is the group id

    def start(self) -> None:
        cmd = [sys.executable, "-m", "worker.launch", str(os.getpid()), *resolve_program(self.argv)]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=self.env, start_new_session=True)
        for stream, is_stdout in ((self.process.stdout, True), (self.process.stderr, False)):
            pump = threading.Thread(target=self._pump, args=(stream, is_stdout), daemon=True,
                                    name=f"job{self.job_id}-{'out' if is_stdout else 'err'}")
            pump.start()
            self._pumps.append(pump)

    def _pump(self, stream: Any, is_stdout: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            record = _json_record(line) if is_stdout else None
            metric = _as_metric(record)
            event = (record or {}).get("event")
            self.training_started |= event == "start"
            self.training_done |= event == "done"
            if event == "failed" and self.failure_message is None and isinstance(record.get("message"), str):
                self.failure_message = record["message"]
            line = cut_log_line(line, MAX_LOG_LINE_CHARS)   # e.g. a printed tensor
            with self._lock:
                if metric is not None:   # a point, not a log line: the human progress line says it on stderr
                    self.pending_metrics.append(metric)
                else:
                    self.pending_logs.append(line)
                if not is_stdout:
                    self.stderr_tail.append(line)
                    del self.stderr_tail[:-200]
        stream.close()

    def backfill_metrics(self, metrics_file: Path) -> None:
        """Queue the points a previous attempt wrote to metrics.jsonl: its worker may have died before
        sending them, and the trainer drops the ones after its checkpoint when it resumes. The server
        ignores points it already has (one that differs only in its missing ETA too)."""
        if not metrics_file.is_file():
            return
        by_step: dict[int, dict[str, Any]] = {}
        for line in metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
            metric = _parse_metric(line)
            if metric is not None:   # its ETA was the old run's: until this one reports, none is better
                by_step[metric["step"]] = {**metric, "eta_s": None}
        with self._lock:
            self.pending_metrics[:0] = [by_step[step] for step in sorted(by_step)]

    def take_batch(self) -> Batch:
        with self._lock:
            return Batch(metrics=list(self.pending_metrics), logs=list(self.pending_logs), log_start=self.logs_acked)

    def ack(self, batch: Batch) -> None:
        with self._lock:
            del self.pending_metrics[:len(batch.metrics)]
            del self.pending_logs[:len(batch.logs)]
            self.logs_acked += len(batch.logs)

    def drop_pending(self) -> None:
        """Forget what is not sent yet: the job is no longer this worker's to report."""
        with self._lock:
            self.pending_metrics.clear()
            self.pending_logs.clear()

    def stop(self, reason: StopReason, grace_s: float) -> None:
        if self.training_done:
            # Training is over and the trainer is exiting: a SIGTERM now would only turn a finished job into
            # a cancelled one (or a torchrun error). It gets the grace to exit; then SIGKILL as always.
            if self.kill_deadline is None:
                self.kill_deadline = time.monotonic() + grace_s
            return
        if self.stop_reason is None:
            self.stop_reason = reason
            self.kill_deadline = time.monotonic() + grace_s
            self._signal_trainers(signal.SIGTERM)

    def _signal_trainers(self, sig: signal.Signals) -> None:
        """Under torchrun, the ranks and their children but not torchrun: ranks that save and exit 0 let it
        exit 0 too, where a SIGTERM of its own ends it with a SignalException traceback and exit 1."""
        if Path(self.argv[0]).name != "torchrun":
            self._signal_all(sig)
            return
        ranks = [pid for pid in pids_with_env(RUN_ENV, self.marker) if pid != self.pgid]
        if not ranks:   # torchrun has not started them yet
            self._signal_all(sig)
        for pid in ranks:
            _kill(pid, sig)

    def _signal_all(self, sig: signal.Signals) -> None:
        _killpg(self.pgid, sig)
        for pid in pids_with_env(RUN_ENV, self.marker):
            _kill(pid, sig)

    def poll(self) -> int | None:
        """The exit code once the process tree is gone; enforces the SIGKILL deadline meanwhile."""
        assert self.process is not None
        if self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
            self._signal_all(signal.SIGKILL)
            self.kill_deadline = None
        code = self.process.poll()
        if code is None:
            return None
        self._signal_all(signal.SIGKILL)  # ranks or data loaders the launcher left behind
        # and wait for them to be gone (a rank in an NFS write or freeing GPU memory takes a moment): only then
        # are its GPUs free and may the job's next attempt start on its output dir
        deadline = time.monotonic() + LEFTOVER_WAIT_S
        while pids_with_env(RUN_ENV, self.marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pump in self._pumps:
            pump.join(timeout=5)
        return code

    def outcome(self, exit_code: int) -> Outcome:
        trainer_code = trainer_exit_code(exit_code, self.stderr_tail)
        if self.stop_reason is not None and trainer_code == exit_codes.STOPPED_UNSAVED:
            # A stop before the first step (or a second signal) is what was asked for; torchrun's
            # ChildFailedError report above in the log would read as a crash.
            launcher = " (torchrun reports that as a failure above)" if Path(self.argv[0]).name == "torchrun" else ""
            with self._lock:
                self.pending_logs.append(f"[paratrain] stopped as asked, before its first step or by a second "
                                         f"signal: no new checkpoint, exit {exit_codes.STOPPED_UNSAVED}{launcher}")
        # trainer_code, the contract's, not torchrun's 1, in every outcome
        if self.stop_reason == StopReason.release:
            return Outcome(trainer_code, None, "worker stopping", release=True)
        if self.stop_reason == StopReason.cancel:
            return Outcome(trainer_code, "cancelled", "cancelled by request")
        if self.stop_reason == StopReason.lost:
            return Outcome(trainer_code, "cancelled", "no longer this worker's (the server re-queued it)")
        if exit_code == 0 and self.training_started and not self.training_done:
            # exit 0 without the done event: a stop signal from outside the worker (an operator's kill,
            # another worker process under this name). It saved a checkpoint: the job is re-queued like a
            # lost one, up to its max_attempts
            return Outcome(trainer_code, "lost", "the trainer was stopped before its last step by a signal the "
                           "worker did not send; it saved a checkpoint")
        failure_class, reason = classify_exit(exit_code, self.stderr_tail, self.failure_message)
        return Outcome(trainer_code, failure_class, reason)   # the contract's code, not torchrun's 1


def _json_record(line: str) -> dict[str, Any] | None:
    """One of the trainer's JSON lines (a metric or an event), or None for anything else."""
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _as_metric(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record as a metric point, or None. A step the server would refuse (not a count) leaves the line a
    log line: passed on, it would cost its whole report."""
    if (record is not None and all(k in record for k in METRIC_KEYS) and "event" not in record
            and type(record["step"]) is int and record["step"] >= 0):
        # NaN/Infinity (json.loads takes them) cannot be sent as JSON: as missing values they cannot stop reports
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return None


def _parse_metric(line: str) -> dict[str, Any] | None:
    return _as_metric(_json_record(line))


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes of this user whose environment has name=value (another user's environment is not
    readable, and the trainer runs as the worker's user)."""
    found = []
    for process in psutil.process_iter():
        try:
            if (process.pid != os.getpid() and process.environ().get(name) == value
                    and process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)):
                found.append(process.pid)
        except (psutil.Error, OSError):   # gone meanwhile, or not ours
            continue
    return found


def trainer_exit_code(exit_code: int, stderr_lines: list[str]) -> int:
    """The trainer's own exit code: torchrun exits 1 and prints the root cause's `exitcode : N`."""
    if exit_code != 1:
        return exit_code
    text = "\n".join(stderr_lines)
    root = text.rfind("Root Cause")
    match = _TORCHRUN_EXITCODE.search(text, root if root >= 0 else 0)
    return int(match.group(1)) if match else exit_code


def _trainer_stderr(stderr_lines: list[str]) -> list[str]:
    """stderr without torchrun's failure summary (a block fenced by ===== lines) and tracebacks' noise."""
    for i, line in enumerate(stderr_lines):
        if "failed (exitcode" in line and "torch/distributed/elastic" in line:  # torchrun's own report follows
            stderr_lines = stderr_lines[:i]
            break
        if line.startswith("=" * 20) and any("FAILED" in x for x in stderr_lines[i:i + 3]):
            stderr_lines = stderr_lines[:i]
            break
    return stderr_lines[-STDERR_TAIL_LINES:]


def classify_exit(exit_code: int, stderr_lines: list[str], message: str | None = None) -> tuple[str | None, str | None]:
    """(failure_class, failure_reason) by the trainer contract: 0 ok, 2 data, 3 OOM, 4 diverged (data: the
    settings fail again the same way), signal or else crash. `message`: the trainer's own reason (its `failed`
    event), else its stderr's last lines are the reason."""
    code = trainer_exit_code(exit_code, stderr_lines)
    tail = "\n".join(_trainer_stderr(stderr_lines)).strip()
    if message and code in (exit_codes.BAD_INPUT, exit_codes.OUT_OF_MEMORY, exit_codes.DIVERGED):
        tail = message.strip()   # the lines before it are progress: a diverged run's reason began "step 21/100 ..."
    if code == exit_codes.OK:
        return None, None
    if code == exit_codes.BAD_INPUT:
        return "data", tail or "bad config or data (exit 2)"
    if code == exit_codes.OUT_OF_MEMORY:
        return "oom", tail or "out of memory (exit 3)"
    if code == exit_codes.DIVERGED:   # like bad data, the same settings diverge again: a gang is not re-queued
        return "data", tail or "training diverged: a NaN or infinite loss (exit 4)"
    if code == exit_codes.SUPERSEDED:  # a later attempt started on the output dir: this one is a lost run
        return "lost", tail or "another run took over the job's output dir (exit 5)"
    if "No space left on device" in tail:
        return "crash", f"disk full (No space left on device), exit code {code}; the last complete checkpoint " \
                        f"is kept: free space and retry to resume\n{tail}"
    if code < 0 or code > 128:
        signum = -code if code < 0 else code - 128
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        return "crash", f"killed by {name}" + (f"\n{tail}" if tail else "")
    return "crash", f"exit code {code}" + (f"\n{tail}" if tail else "")


def find_orphans(launched_by: str) -> dict[int, list[int]]:
    """Process groups (pgid -> pids) a previous worker of this name started and left behind."""
    own_pgid = os.getpgid(0)
    groups: dict[int, list[int]] = {}
    for pid in pids_with_env(LAUNCHED_BY_ENV, launched_by):
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            continue
        if pgid != own_pgid:
            groups.setdefault(pgid, []).append(pid)
    return groups


# Linux delivers a launcher's death signal (worker.launch) when the worker that started it dies, even by SIGKILL.
DEATH_SIGNAL_DELIVERED = sys.platform.startswith("linux")


def kill_groups(pgids: list[int], grace_s: float, *, terminate: bool = True) -> None:
    """SIGTERM every group (unless `terminate` is False: they were signalled already), wait up to grace_s for
    them to go, SIGKILL what is left."""
    for pgid in pgids if terminate else []:
        _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pgids and time.monotonic() < deadline:
        pgids = [g for g in pgids if _group_alive(g)]
        time.sleep(0.1)
    for pgid in pgids:
        _killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
