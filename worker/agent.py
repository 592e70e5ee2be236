"""The worker's flat loop: kill a predecessor's leftovers -> register -> (heartbeat thread) -> repeat
{apply cancels, reap finished jobs, send batched metrics/logs, claim work for free GPUs} until stopped.

Signals only set flags: the first SIGTERM/SIGINT is a warm stop (claim nothing more, let running jobs
finish); the second is cold (stop every job with SIGTERM and hand it back to the queue, to resume from
its checkpoint elsewhere). With `stop_mode` cold (containers) the first one is."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from server.models import Claim, reason_in_one_line
from trainer_core import exit_codes
from trainer_core.command import trainer_argv
from trainer_core.config import format_validation_error, job_config
from worker.client import JobGone, Refused, ServerClient, Superseded, Unauthorized, Unreachable, UnreadableClaim
from worker.runner import (DEATH_SIGNAL_DELIVERED, LAUNCHED_BY_ENV, RUN_ENV, SAFE_PATH_ENV, JobRun, Outcome, StopReason,
                           find_orphans, kill_groups)
from worker.settings import WorkerSettings

log = logging.getLogger("paratrain.worker")

EXIT_SUPERSEDED = 4   # another process registered under this worker's name: do not restart this one
MAX_METRICS_PER_REPORT = 500
MAX_LOGS_PER_REPORT = 2000
MAX_REPORT_LOG_BYTES = 4 * 1024 * 1024   # well under the server's default 16 MB body limit, in any script
# paratrain's own secrets never reach the job's processes (what a job runs is not trusted with them)
SECRET_ENV = ("PARATRAIN_WORKER_TOKEN", "PARATRAIN_USER_TOKEN")
# Once registered, a call that fails for these is retried while the jobs train on. A token refused mid-job is
# one the server changed (or another server on the URL): training on loses nothing, stopping loses the steps
# since the last checkpoint, and the operator fixes the token.
RETRIED = (*Unreachable, Unauthorized)


def free_port() -> int:
    """A TCP port free right now: offered with each claim, in case this worker becomes node 0 of a
    multi-node job and its torchrun hosts the rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class OutageLog:
    """What the worker logs while the server cannot take its calls, which it retries every report interval:
    a line per retry and job would bury its log. An outage (no connection) is one warning, a reminder a
    minute and one line when the server answers again; an error status (a 5xx, a proxy's 408/429) is an
    answer, logged at most once a minute per call."""

    REMIND_S = 60.0

    def __init__(self) -> None:
        self.token_refused = False   # the last answer refused the worker token (cleared by the next good one)
        self._since: float | None = None
        self._reminded = 0.0
        self._status_logged: dict[str, float] = {}
        self._lock = threading.Lock()   # the heartbeat thread reports here too

    def failed(self, what: str, error: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            if isinstance(error, Unauthorized):
                self.token_refused = True
                if now - self._status_logged.get("token", -self.REMIND_S) >= self.REMIND_S:
                    self._status_logged["token"] = now
                    log.error("the server refused this worker's token at %s (was the token changed, or is another "
                              "server answering?); its jobs train on and what is not delivered is kept, but after "
                              "the lease TTL the server re-queues them: restart this worker with the server's "
                              "worker token", what)
            elif isinstance(error, httpx.HTTPStatusError):
                if now - self._status_logged.get(what, -self.REMIND_S) >= self.REMIND_S:
                    self._status_logged[what] = now
                    log.warning("the server answered %s to %s; retrying, and keeping what is not delivered",
                                error.response.status_code, what)
            elif self._since is None:
                self._since = self._reminded = now
                log.warning("server unreachable (%s: %s); retrying, and keeping what is not delivered", what, error)
            elif now - self._reminded >= self.REMIND_S:
                self._reminded = now
                log.warning("server still unreachable after %.0f s (%s: %s)", now - self._since, what, error)

    def answered(self) -> None:
        with self._lock:
            self.token_refused = False
            if self._since is not None:
                log.info("server reachable again after %.0f s", time.monotonic() - self._since)
                self._since = None


class Agent:
    def __init__(self, settings: WorkerSettings, client: ServerClient, gpus: list[dict]) -> None:
        self.settings = settings
        self.client = client
        self.gpus = gpus
        self.worker_id: int | None = None
        self.heartbeat_interval_s = 5.0
        self.runs: dict[int, JobRun] = {}
        self.finished: dict[int, tuple[JobRun, Outcome]] = {}  # exited, final report not yet accepted
        # jobs whose finish the server refused -> until when: not offered here again before their lease ran out
        self.abandoned: dict[int, float] = {}
        self.lease_ttl_s = 30.0
        self.warm_stop = threading.Event()
        self.cold_stop = threading.Event()
        self._stops: set[tuple[int, int]] = set()   # (job id, attempt) the server told us to stop
        self._cancel_lock = threading.Lock()
        self._next_claim = 0.0
        self._forgotten_id: int | None = None  # a registration the server no longer knows (a new database)
        self.superseded: str | None = None  # why this process must stop: another registered under its name
        self.outage = OutageLog()

    # --- signals -----------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.warm_stop.is_set() or self.settings.stop_mode == "cold":
            self.cold_stop.set()
        self.warm_stop.set()

    # --- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        orphans = find_orphans(self.settings.identity)
        if orphans:
            # They got their death signal when that worker died and are saving a checkpoint: a second SIGTERM
            # would make the trainers exit without it (their rule for a second signal). So wait, then SIGKILL.
            log.warning("waiting up to %.0f s for process groups %s left by a previous worker %r to save and exit",
                        self.settings.kill_grace_s, sorted(orphans), self.settings.name)
            kill_groups(list(orphans), self.settings.kill_grace_s, terminate=not DEATH_SIGNAL_DELIVERED)
        if not self._register():
            return 1
        stopped = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, args=(stopped,), daemon=True, name="heartbeat")
        beat.start()
        announced = set()   # which stop the log has announced (signal handlers must not log)
        try:
            while True:
                self._register_again_if_forgotten()
                if self.superseded is not None and "superseded" not in announced:
                    announced.add("superseded")
                    log.error("%s; stopping this one (its jobs were re-queued; set --name or "
                              "PARATRAIN_WORKER_NAME)", self.superseded)
                    self.warm_stop.set()
                    self.cold_stop.set()
                if self.warm_stop.is_set() and "warm" not in announced:
                    announced.add("warm")
                    self._announce_stopping()
                    if self.runs and not self.cold_stop.is_set():
                        log.info("stopping: no new jobs; waiting for job(s) %s to finish (signal again to hand "
                                 "them back to the queue now)", sorted(self.runs))
                    else:
                        log.info("stopping")
                if self.cold_stop.is_set():
                    if "cold" not in announced and self.runs:
                        log.info("handing job(s) %s back to the queue: they resume from their last checkpoint",
                                 sorted(self.runs))
                    announced.add("cold")
                    for run in self.runs.values():
                        run.stop(StopReason.release, self.settings.kill_grace_s)
                self._apply_cancels()
                self._reap()
                self._send_reports()
                if not self.warm_stop.is_set():
                    self._claim()
                elif not self.runs and not self.finished:
                    return 0 if self.superseded is None else EXIT_SUPERSEDED
                elif not self.runs and self.outage.token_refused:
                    # stopping, and the server refuses what is left to deliver: waiting would never end
                    log.error("stopping without delivering the end of job(s) %s: the server refuses this worker's "
                              "token (their leases run out and the server re-queues them)", sorted(self.finished))
                    return 1
                time.sleep(self.settings.report_interval_s)
        finally:
            # Runs left here mean an unexpected error. Leave nothing behind, but let the trainers save a
            # checkpoint first (SIGTERM, then SIGKILL after the grace), heartbeats still renewing their leases
            # meanwhile: the job's next attempt resumes from that checkpoint, and starts only once it is saved.
            for run in self.runs.values():
                run.stop(StopReason.release, self.settings.kill_grace_s)
            deadline = time.monotonic() + self.settings.kill_grace_s + 5
            while time.monotonic() < deadline and any(run.poll() is None for run in list(self.runs.values())):
                time.sleep(0.2)
            stopped.set()
            self._leave()

    def _leave(self) -> None:
        """Say goodbye, so the server shows this worker offline now rather than after a lease TTL."""
        assert self.worker_id is not None
        if self.superseded is not None:   # the name is another process's now: its worker stays online
            return
        try:
            self.client.leave(self.worker_id)
        except (*RETRIED, JobGone, Superseded, Refused) as e:
            log.warning("could not tell the server this worker stopped (%s); it shows offline after the "
                        "lease TTL", e)
            return
        log.info("worker %s (%s) stopped", self.worker_id, self.settings.name)

    def _register(self) -> bool:
        while not self.warm_stop.is_set():
            try:
                reply = self.client.register(name=self.settings.name, hostname=socket.gethostname(), gpus=self.gpus)
            except Unreachable as e:
                self.outage.failed(f"registering at {self.settings.server_url}", e)
                time.sleep(2)
                continue
            except (Unauthorized, Refused) as e:
                log.error("%s", e)
                return False
            except JobGone as e:   # 404: something answers at that URL, but no paratrain API under /api
                log.error("no paratrain server at %s (%s): is --server the server's root URL (e.g. "
                          "http://host:8000, without /api or /ui)?", self.settings.server_url, e)
                return False
            self.outage.answered()
            self.worker_id = reply.worker_id
            self.heartbeat_interval_s = reply.heartbeat_interval_s
            self.lease_ttl_s = reply.lease_ttl_s
            log.info("registered as worker %s (%s) with GPUs %s", self.worker_id, self.settings.name,
                     [g["index"] for g in self.gpus] or "none (CPU mode)")
            return True
        return False

    def _heartbeat_loop(self, stopped: threading.Event) -> None:
        assert self.worker_id is not None
        while not stopped.is_set():
            worker_id = self.worker_id
            try:
                self._beat(worker_id)
                if self.settings.health_file is not None:
                    self.settings.health_file.touch()
            except RETRIED as e:
                self.outage.failed("heartbeat", e)
            except Refused as e:
                log.warning("heartbeat failed: %s", e)
            except JobGone:
                self._forgotten_id = worker_id
            except Superseded as e:
                self.superseded = str(e)
                return
            stopped.wait(self.heartbeat_interval_s)

    def _announce_stopping(self) -> None:
        """Tell the server now, not at the next heartbeat, and before any job is handed back: when this worker
        stops its node of a gang, the other nodes stop with it, and their finishes may reach the server first."""
        assert self.worker_id is not None
        try:
            self._beat(self.worker_id)
        except (*RETRIED, Refused, JobGone, Superseded):
            pass   # the heartbeat thread keeps trying

    def _register_again_if_forgotten(self) -> None:
        forgotten, self._forgotten_id = self._forgotten_id, None
        # Only if it is still our registration: a beat sent under the old id and answered after this worker
        # registered again would register it a third time, and that re-queues the job it claimed meanwhile.
        if forgotten is not None and forgotten == self.worker_id:
            log.warning("the server does not know worker %s any more; registering again", forgotten)
            self._register()

    def _beat(self, worker_id: int) -> None:
        # The server names jobs, not attempts. A reply can arrive after this worker ended the attempt it was
        # about and claimed the job's next one (a gang re-forming): the stop is for the attempt it was sent for.
        attempts = {job_id: run.attempt for job_id, run in dict(self.runs).items()}
        attempts.update({job_id: run.attempt for job_id, (run, _) in dict(self.finished).items()})
        stop = self.client.heartbeat(worker_id, sorted(attempts), stopping=self.warm_stop.is_set())
        self.outage.answered()
        with self._cancel_lock:
            self._stops.update((job_id, attempts[job_id]) for job_id in stop if job_id in attempts)

    def _apply_cancels(self) -> None:
        with self._cancel_lock:
            stops, self._stops = self._stops, set()
        for job_id, attempt in stops:
            run = self.runs.get(job_id)
            if run is not None and run.attempt == attempt and run.stop_reason is None:
                log.info("stopping job %s (cancelled or no longer ours)", job_id)
                run.stop(StopReason.cancel, self.settings.kill_grace_s)

    # --- jobs --------------------------------------------------------------------------------------
    def _claim(self) -> None:
        now = time.monotonic()
        if now < self._next_claim:
            return
        busy = {i for run in self.runs.values() for i in run.gpu_ids}
        free = [g["index"] for g in self.gpus if g["index"] not in busy]
        cpu_jobs = sum(1 for run in self.runs.values() if not run.gpu_ids)
        accept_cpu = cpu_jobs < self.settings.max_cpu_jobs
        if not free and not accept_cpu:
            return
        assert self.worker_id is not None
        try:
            claim = self.client.claim(self.worker_id, free_gpu_indices=free, accept_cpu_jobs=accept_cpu,
                                      rdzv_address=self.settings.rdzv_address or None, rdzv_port=free_port(),
                                      busy_job_ids=sorted({*self.runs, *self.finished, *self._abandoned_now()}))
            self.outage.answered()
        except RETRIED as e:
            self.outage.failed("claim", e)
            claim = None
        except UnreadableClaim as e:   # leased to us now: failed with the reason, not left to lapse and recur
            self._fail_unstarted(e.job_id, e.attempt, "this worker cannot read the server's claim (a worker of "
                                                      f"another version than the server?): {e}")
            claim = None
        except (JobGone, Refused) as e:
            log.warning("claim failed: %s", e)
            claim = None
        except Superseded as e:
            self.superseded = str(e)
            claim = None
        if claim is None:
            self._next_claim = now + self.settings.claim_interval_s
            return
        self._start(claim)  # and claim again on the next turn: more may fit

    def _abandoned_now(self) -> list[int]:
        now = time.monotonic()
        self.abandoned = {job_id: until for job_id, until in self.abandoned.items() if until > now}
        return list(self.abandoned)

    def _start(self, claim: Claim) -> None:
        job, gpu_ids = claim.job, claim.gpu_ids
        try:
            config = job_config(job.config, unknown_allowed=claim.default_fields)
        except ValidationError as e:  # stored by a server whose schema differs from ours: that job fails, not the worker
            self._fail_unstarted(job.id, job.attempt, unrunnable_config_reason(e))
            return
        if dropped := sorted(set(job.config) - set(type(config).model_fields)):
            log.info("job %s: leaves %s at the server's default, which this worker does not know",
                     job.id, ", ".join(dropped))
        # Derived here, not taken from claim.argv: this machine's trainer program and schema are the ones
        # that run. For a standard worker it is the same command (trainer_core.command.trainer_argv on both sides).
        argv = trainer_argv(config, nproc=job.nproc, rendezvous=claim.rendezvous,
                            trainer=self.settings.trainer, use_torchrun=self.settings.use_torchrun)
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env.update({
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids)),  # empty for a CPU job: no GPU at all
            "PYTHONUNBUFFERED": "1",
            **SAFE_PATH_ENV,
            "PARATRAIN_JOB_ID": str(job.id),
            LAUNCHED_BY_ENV: self.settings.identity,
            RUN_ENV: f"{self.settings.identity}/{job.id}/{job.attempt}",
        })
        run = JobRun(job_id=job.id, attempt=job.attempt, gpu_ids=gpu_ids, argv=argv, env=env)
        # a later attempt, or a retry (its server copied the original's file): the curve so far
        run.backfill_metrics(Path(job.config["output_dir"]) / "metrics.jsonl")
        try:
            run.start()
        except OSError as e:
            log.error("job %s: could not start %s: %s", job.id, argv[0], e)
            self._finish(run, Outcome(127, "crash", f"could not start {argv[0]}: {e}"))
            return
        self.runs[run.job_id] = run
        log.info("job %s attempt %s started (pgid %s): %s", run.job_id, run.attempt, run.pgid, " ".join(argv))

    def _fail_unstarted(self, job_id: int, attempt: int, reason: str) -> None:
        """A claimed job this worker cannot even start (a server of another version): it fails as bad input
        with the reason, so it neither waits out its lease nor comes back to fail the same way."""
        log.error("job %s: %s", job_id, reason)
        self._finish(JobRun(job_id=job_id, attempt=attempt, gpu_ids=[], argv=[], env={}),
                     Outcome(exit_codes.BAD_INPUT, "data", reason))

    def _reap(self) -> None:
        for job_id, run in list(self.runs.items()):
            code = run.poll()
            if code is not None:
                del self.runs[job_id]
                outcome = run.outcome(code)
                self.finished[job_id] = (run, outcome)
                log.info("%s", describe_outcome(run, outcome))
        for job_id, (run, outcome) in list(self.finished.items()):
            if self._send_report(run, final=True):
                self._finish(run, outcome)

    def _finish(self, run: JobRun, outcome: Outcome) -> None:
        assert self.worker_id is not None
        try:
            self.client.finish(run.job_id, worker_id=self.worker_id, attempt=run.attempt,
                               exit_code=outcome.exit_code, failure_class=outcome.failure_class,
                               failure_reason=outcome.failure_reason, release=outcome.release)
            self.outage.answered()
        except RETRIED as e:
            self.outage.failed(f"job {run.job_id}'s finish", e)
            self.finished[run.job_id] = (run, outcome)
            return
        except Refused as e:   # dropped: the lease then runs out and the server re-queues or fails the job
            log.error("job %s: the server refused its finish (%s)", run.job_id, e)
            # else the server offers the attempt again (it thinks the answer to the claim was lost)
            self.abandoned[run.job_id] = time.monotonic() + 2 * self.lease_ttl_s
        except JobGone:
            pass
        self.finished.pop(run.job_id, None)

    def _send_reports(self) -> None:
        for run in list(self.runs.values()):
            self._send_report(run)

    def _send_report(self, run: JobRun, final: bool = False) -> bool:
        """True when everything the job printed so far is on the server (or the job is no longer ours)."""
        assert self.worker_id is not None
        while True:
            batch = run.take_batch()
            batch.metrics = batch.metrics[:MAX_METRICS_PER_REPORT]
            batch.logs = _within_bytes(batch.logs[:MAX_LOGS_PER_REPORT], MAX_REPORT_LOG_BYTES)
            if not batch.metrics and not batch.logs:
                return True
            try:
                cancelled = self.client.report(run.job_id, worker_id=self.worker_id, attempt=run.attempt,
                                               metrics=batch.metrics, logs=batch.logs, log_start=batch.log_start)
                self.outage.answered()
                if cancelled:   # applied with the heartbeat's, by the main loop
                    with self._cancel_lock:
                        self._stops.add((run.job_id, run.attempt))
            except RETRIED as e:
                self.outage.failed(f"job {run.job_id}'s report", e)
                return False
            except JobGone:
                log.warning("job %s is no longer ours; stopping it", run.job_id)
                if not final:
                    run.stop(StopReason.lost, self.settings.kill_grace_s)
                run.drop_pending()
                return True
            except Refused as e:   # resending the same batch would be refused forever: drop it, go on
                log.error("job %s: the server refused %d log lines and %d metric points (%s); they are dropped",
                          run.job_id, len(batch.logs), len(batch.metrics), e)
            run.ack(batch)
            if not final:
                return True


def unrunnable_config_reason(e: ValidationError) -> str:
    """Why this worker refuses a claimed job's config. Fields it does not know mean a newer server (the job
    uses a feature this worker lacks); other errors, a schema that changed in some other way."""
    unknown = [str(err["loc"][0]) for err in e.errors() if err["type"] == "extra_forbidden" and err["loc"]]
    if unknown and len(unknown) == len(e.errors()):
        return (f"this worker's paratrain does not know the config field(s) {', '.join(unknown)}, which this job "
                "sets: upgrade the worker to the server's version")
    return ("this worker cannot run the stored config (is its paratrain the server's version?): "
            f"{format_validation_error(e)}")


def describe_outcome(run: JobRun, outcome: Outcome) -> str:
    """One log line for an operator: which attempt, how it ended, and why (a reason's first and last lines:
    the worker's headline and a traceback's cause)."""
    what = f"job {run.job_id} attempt {run.attempt}"
    if outcome.release:
        return f"{what} handed back to the queue (exit {outcome.exit_code})"
    if outcome.failure_class is None:
        return f"{what} succeeded"
    why = reason_in_one_line(outcome.failure_reason)
    return f"{what} ended: {outcome.failure_class}, exit {outcome.exit_code}" + (f": {why}" if why else "")


def _within_bytes(lines: list[str], limit: int) -> list[str]:
    """The first lines whose UTF-8 text fits in `limit` bytes (at least one: a line is at most
    MAX_LOG_LINE_CHARS characters)."""
    total = 0
    for i, line in enumerate(lines):
        total += len(line.encode("utf-8", errors="replace")) + 4   # and its JSON quotes and comma
        if total > limit and i > 0:
            return lines[:i]
    return lines
