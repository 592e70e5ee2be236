"""Exit-code classification, the torchrun argv and the end of a run, without real trainers."""

from __future__ import annotations

import json

from trainer_core.command import trainer_argv
from trainer_core.config import TrainConfig
from worker.runner import _parse_metric, classify_exit, trainer_exit_code

TORCHRUN_FAILURE = """\
/data/d.jsonl:3: 'branches' must be a list of strings
E1127 12:00:00.000000 1 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 2)
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 8, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
trainer_core.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-27_12:00:00
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 11)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_12:00:00
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 10)
============================================================""".splitlines()


def test_a_requested_stop_before_the_first_step_is_explained_in_the_log():
    """torchrun reports the trainer's exit 130 as a ChildFailedError: the log says it was the asked-for stop."""
    from worker.runner import JobRun, StopReason

    stopped = [line.replace("exitcode  : 2", "exitcode  : 130") for line in TORCHRUN_FAILURE]
    run = JobRun(job_id=1, attempt=1, gpu_ids=[], argv=["torchrun", "-m", "trainer_core.train"], env={})
    run.stderr_tail = stopped
    run.stop_reason = StopReason.cancel
    assert run.outcome(1).failure_class == "cancelled"
    assert run.pending_logs == ["[paratrain] stopped as asked, before its first step or by a second signal: no "
                                "new checkpoint, exit 130 (torchrun reports that as a failure above)"]
    crashed = JobRun(job_id=2, attempt=1, gpu_ids=[], argv=["torchrun"], env={})
    crashed.stderr_tail, crashed.stop_reason = TORCHRUN_FAILURE, StopReason.cancel
    crashed.outcome(1)
    assert crashed.pending_logs == []


def test_torchrun_root_cause_gives_the_trainers_code():
    assert trainer_exit_code(1, TORCHRUN_FAILURE) == 2
    assert trainer_exit_code(1, ["plain crash"]) == 1
    assert trainer_exit_code(-9, TORCHRUN_FAILURE) == -9


def test_failure_classes_follow_the_trainer_contract():
    failure_class, reason = classify_exit(1, TORCHRUN_FAILURE)
    assert failure_class == "data" and reason.startswith("/data/d.jsonl:3:") and "Root Cause" not in reason
    assert classify_exit(3, ["paratrain: out of memory"])[0] == "oom"
    assert classify_exit(0, []) == (None, None)
    failure_class, reason = classify_exit(-9, [])
    assert failure_class == "crash" and reason == "killed by SIGKILL"
    assert classify_exit(137, [])[1] == "killed by SIGKILL"
    assert classify_exit(7, ["boom"]) == ("crash", "exit code 7\nboom")
    assert classify_exit(4, ["paratrain: training diverged at step 3: loss nan"]) == (
        "data", "paratrain: training diverged at step 3: loss nan")
    # the trainer's own reason (its `failed` event) rather than the progress lines before it
    progress = ["step 21/100 (epoch 1) | loss 7.1", "paratrain: training diverged at step 22: loss nan"]
    assert classify_exit(4, progress, "paratrain: training diverged at step 22: loss nan") == (
        "data", "paratrain: training diverged at step 22: loss nan")
    assert classify_exit(4, progress)[1].startswith("step 21/100")   # an older trainer: its stderr tail
    assert classify_exit(-9, ["x"], "a message from before the kill")[1] == "killed by SIGKILL\nx"
    # another attempt took over the output dir: this one is a lost run (its finish is refused as stale)
    assert classify_exit(5, ["out was taken over by run w/3/2 on host b (pid 7) since ..."])[0] == "lost"


def test_a_clean_exit_counts_as_success_only_after_the_done_event():
    """A trainer stopped by a SIGTERM the worker did not send saves and exits 0 without finishing: its job
    must go back to the queue, not become `succeeded` with half its steps."""
    from worker.runner import JobRun, StopReason

    def run(**kw) -> JobRun:
        return JobRun(job_id=1, attempt=1, gpu_ids=[], argv=["trainer"], env={}, **kw)

    finished = run(training_started=True, training_done=True)
    assert finished.outcome(0).release is False and finished.outcome(0).failure_class is None
    stopped = run(training_started=True).outcome(0)
    assert stopped.failure_class == "lost" and "did not send" in stopped.failure_reason
    assert run().outcome(0).failure_class is None   # a node of a gang where global rank 0 does not run
    cancelled = run(training_started=True, stop_reason=StopReason.cancel).outcome(0)
    assert cancelled.failure_class == "cancelled" and cancelled.release is False


def test_a_metric_line_is_a_point_and_not_also_a_log_line():
    """The trainer prints each step twice: a JSON point on stdout, a progress line on stderr. Stored as logs
    both, they doubled the log for nothing."""
    import io

    from worker.runner import JobRun

    run = JobRun(job_id=1, attempt=1, gpu_ids=[], argv=["trainer"], env={})
    stdout = ['{"event": "start", "total_steps": 2}', '{"step": 1, "epoch": 1, "loss": 7.1, "lr": 0.001, '
              '"grad_norm": 1.0, "tokens_per_s": 10.0, "gpu_mem_gb": null, "eta_s": 1.0}', "a plain line"]
    run._pump(io.BytesIO("\n".join(stdout).encode() + b"\n"), is_stdout=True)
    run._pump(io.BytesIO(b"step 1/2 (epoch 1) | loss 7.1000\n"), is_stdout=False)
    assert [m["step"] for m in run.pending_metrics] == [1]
    assert run.pending_logs == [stdout[0], "a plain line", "step 1/2 (epoch 1) | loss 7.1000"]


def test_a_huge_output_line_is_cut_to_what_the_server_keeps_with_its_length_named():
    import io

    from server.models import cut_log_line
    from server.settings import Settings
    from worker.runner import MAX_LOG_LINE_CHARS, JobRun

    run = JobRun(job_id=1, attempt=1, gpu_ids=[], argv=["trainer"], env={})
    run._pump(io.BytesIO(b"tensor([" + b"0.1234, " * 200_000 + b"])\n"), is_stdout=False)
    [line] = run.pending_logs
    assert line.startswith("tensor([0.1234, ") and line.endswith(" characters cut]")
    assert len(line) <= MAX_LOG_LINE_CHARS == Settings().max_log_line_chars
    kept = len(line) - len(line[line.rindex(" [... "):])
    assert f"[... {1_600_010 - kept:,} characters cut]" in line   # of the line the trainer printed
    # the server keeps that line whole, the marker included; at a lower limit it cuts again, saying so
    assert cut_log_line(line, Settings().max_log_line_chars) == line
    assert cut_log_line("x" * 100, 50) == "x" * 10 + " [... 90 characters cut]"
    assert cut_log_line("short", 50) == "short"


def test_backfilled_points_keep_their_values_but_not_the_old_runs_eta(tmp_path):
    from worker.runner import JobRun

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 7.0, "eta_s": 30.0}\n{"step": 2, "loss": 6.5, "eta_s": 20.0}\nnot json\n')
    run = JobRun(job_id=1, attempt=2, gpu_ids=[], argv=["trainer"], env={})
    run.backfill_metrics(metrics)
    assert run.pending_metrics == [{"step": 1, "loss": 7.0, "eta_s": None}, {"step": 2, "loss": 6.5, "eta_s": None}]


def test_metric_lines_are_json_objects_with_step_and_loss():
    assert _parse_metric('{"step": 3, "loss": 1.5, "lr": 0.1}') == {"step": 3, "loss": 1.5, "lr": 0.1}
    assert _parse_metric('{"event": "checkpoint", "step": 3, "loss": 1}') is None
    assert _parse_metric('{"step": 3}') is None
    assert _parse_metric('{"step": -1, "loss": 1}') is None and _parse_metric('{"step": "3", "loss": 1}') is None
    assert _parse_metric('{"step": true, "loss": 1}') is None and _parse_metric('{"step": 2.5, "loss": 1}') is None
    assert _parse_metric("step 3/10") is None and _parse_metric("{not json") is None


def test_a_long_failure_reason_keeps_its_end_within_what_the_server_takes():
    from worker.runner import MAX_FAILURE_REASON_CHARS, Outcome

    reason = "\n".join(f"traceback line {i} " + "x" * 3000 for i in range(40)) + "\nValueError: the cause"
    outcome = Outcome(1, "crash", reason)
    assert len(outcome.failure_reason) <= MAX_FAILURE_REASON_CHARS + 10 < 20_000   # Finish.failure_reason
    assert outcome.failure_reason.startswith("[...]") and outcome.failure_reason.endswith("ValueError: the cause")
    assert Outcome(2, "data", "d.jsonl:3: bad").failure_reason == "d.jsonl:3: bad"


def test_a_report_holds_no_more_log_bytes_than_the_limit_in_any_script():
    from worker.agent import _within_bytes

    cjk = ["训练" * 2000] * 10   # 4,000 characters, 12,000 bytes each
    assert len(_within_bytes(cjk, 50_000)) == 4 and _within_bytes(cjk, 10) == cjk[:1]
    assert _within_bytes(["a", "b"], 50_000) == ["a", "b"]


def test_a_nan_metric_from_an_older_trainer_is_sent_as_missing_values():
    """httpx refuses NaN in a JSON body: passed on, one diverged run stopped its worker's reports."""
    metric = _parse_metric('{"step": 3, "loss": NaN, "grad_norm": Infinity, "lr": 0.1}')
    assert metric == {"step": 3, "loss": None, "grad_norm": None, "lr": 0.1}
    json.dumps(metric, allow_nan=False)


def test_argv_is_derived_from_the_config():
    config = TrainConfig(base_model="/m", data_path="/d.jsonl", max_steps=5)
    argv = trainer_argv(config, nproc=1)
    assert argv[:5] == ["torchrun", "--standalone", "--nproc_per_node=1", "-m", "trainer_core.train"]
    assert TrainConfig.from_cli(argv[5:]) == config
    assert "--ddp" in trainer_argv(config, nproc=2) and "--ddp" not in argv


def test_a_run_ends_only_when_its_sigkilled_leftovers_are_gone(monkeypatch):
    """A rank in an uninterruptible write outlives its SIGKILL for a moment: until it is gone its GPUs are not
    free, and the job's next attempt must not start on its output dir."""
    import subprocess

    import worker.runner as runner

    left = [[4242], [4242], []]   # what each scan finds: the rank, still there once more, then gone
    monkeypatch.setattr(runner, "pids_with_env", lambda name, value: left.pop(0))
    run = runner.JobRun(job_id=1, attempt=1, gpu_ids=[0], argv=["trainer"], env={runner.RUN_ENV: "w/1/1"})
    monkeypatch.setattr(run, "_signal_all", lambda sig: None)
    run.process = subprocess.Popen(["true"])
    run.process.wait()
    assert run.poll() == 0 and left == []
