"""`paratrain jobs`: the Jobs tab in a terminal, against a live server and a scripted worker."""

from __future__ import annotations

import httpx
import pytest

from paratrain.cli import main
from tests.ui.conftest import USER_TOKEN

TORCHRUN_TAIL = ["E1129 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0",
                 "Traceback (most recent call last):", "=" * 60, "trainer_core.train FAILED", "=" * 60]


@pytest.fixture
def jobs(live_server, scripted_worker, tmp_path):
    """Job 1 failed on bad data (its log ends in torchrun's report), job 2 waits in the queue; `run(*argv)` runs
    `paratrain jobs ...` against the server."""
    token_file = tmp_path / "token"
    token_file.write_text(USER_TOKEN)
    api = httpx.Client(base_url=live_server.base_url, headers={"Authorization": f"Bearer {USER_TOKEN}"})
    body = {"config": {"base_model": "models/tiny", "data_path": "demo.jsonl", "name": "broken"}, "gpus": 0}
    api.post("/api/jobs", json=body).raise_for_status()
    job = scripted_worker.claim()
    scripted_worker.report(job["id"], range(1, 3), total_steps=10,
                           logs=["step 1/10 | loss 5.0", "demo.jsonl:7: not valid JSON", *TORCHRUN_TAIL])
    scripted_worker.finish(job["id"], exit_code=2, failure_class="data", failure_reason="demo.jsonl:7: not valid JSON")
    api.post("/api/jobs", json={**body, "config": {**body["config"], "name": "waiting"}}).raise_for_status()

    def run(*argv: str) -> int:
        return main(["jobs", *argv, "--server", live_server.base_url, "--token-file", str(token_file)])
    return run


def test_jobs_lists_shows_and_prints_logs_as_the_ui_does(jobs, capsys):
    assert jobs() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "name", "state", "progress", "loss", "val", "loss", "tokens/s", "GPUs"]
    assert lines[1].split()[:3] == ["2", "waiting", "queued"] and lines[2].split()[:5] == ["1", "broken", "failed",
                                                                                          "(data)", "2/10"]
    assert jobs("list", "--state", "queued") == 0 and "broken" not in capsys.readouterr().out

    assert jobs("show", "1") == 0
    out = capsys.readouterr().out
    assert "job 1 broken: failed (data), 2/10 (20%), attempt 1/3" in out and "data:\n  demo.jsonl:7: not valid JSON" in out
    # the log's last lines for people: torchrun's report is one line, the trainer's error stays in view
    assert out.rstrip().endswith("demo.jsonl:7: not valid JSON\n[torchrun: local rank 0 exited with code 2; its "
                                 "report of 5 lines is not shown]")

    assert jobs("logs", "1", "--tail", "2") == 0
    assert capsys.readouterr().out.splitlines() == ["demo.jsonl:7: not valid JSON", "[torchrun: local rank 0 exited "
                                                    "with code 2; its report of 5 lines is not shown]"]
    assert jobs("logs", "1", "--raw", "--tail", "1") == 0
    assert capsys.readouterr().out.strip() == "=" * 60


def test_jobs_cancels_and_retries_and_names_what_it_cannot_do(jobs, capsys):
    assert jobs("cancel", "2") == 0 and capsys.readouterr().out.strip() == "job 2: cancelled"
    assert jobs("cancel", "2") == 2 and "already ended (cancelled)" in capsys.readouterr().err   # the server's 409
    assert jobs("retry", "1") == 0   # job 1 failed on its data before a checkpoint: nothing to resume, and it says so
    assert "job 3 queued, a retry of job 1 (job 1 saved no checkpoint: it starts from step 0)" in capsys.readouterr().out
    assert jobs("show", "99") == 2 and "paratrain jobs: no job 99 on http" in capsys.readouterr().err
    assert jobs("show") == 2 and "show needs a job ID" in capsys.readouterr().err
    assert jobs("list", "3") == 2 and "list takes no job ID: paratrain jobs show 3" in capsys.readouterr().err
    assert jobs("logs", "1", "--tail", "0") == 2 and "--tail takes a count" in capsys.readouterr().err
    assert jobs("show", "1", "--tail", "1") == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-2:] == [
        "log (last lines; paratrain jobs logs for all):", "[torchrun: local rank 0 exited with code 2; its report of 5 "
        "lines is not shown]"]
