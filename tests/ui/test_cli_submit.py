"""`paratrain submit`: a saved job file queued on a live server, followed to its end by its event stream."""

from __future__ import annotations

import threading
import time

import pytest

from paratrain.cli import main
from tests.ui.conftest import USER_TOKEN, free_port

JOB_FILE = """\
base_model: models/tiny
data_path: demo.jsonl
max_steps: 3
job:
  gpus: 1
  priority: 2
"""


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(USER_TOKEN + "\n")
    return path


def _submit_in_thread(argv: list[str]) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rc=main(argv)), daemon=True)
    thread.start()
    return thread, result


def _claimed(worker) -> dict:
    deadline = time.time() + 20
    while (job := worker.claim()) is None:
        assert time.time() < deadline, "the submitted job never reached the queue"
        time.sleep(0.1)
    return job


def test_submit_follow_prints_the_progress_and_exits_by_the_final_state(live_server, scripted_worker, tmp_path,
                                                                        token_file, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB_FILE)
    argv = ["submit", str(job_file), "--server", live_server.base_url, "--token-file", str(token_file), "--follow"]

    thread, result = _submit_in_thread(argv)
    job = _claimed(scripted_worker)
    assert (job["gpus"], job["priority"], job["config"]["max_steps"]) == (1, 2, 3)   # the file's job: section
    scripted_worker.report(job["id"], range(1, 4), total_steps=3)
    scripted_worker.finish(job["id"], exit_code=0)
    thread.join(30)
    out = capsys.readouterr().out
    assert result == {"rc": 0}, out
    assert f"job {job['id']} queued" in out and "running (attempt 1)" in out
    assert "step 3/3  loss 3.8462  lr 6.00e-05  1,234 tokens/s  3.5 GiB  eta 0 s" in out
    assert f"job {job['id']} succeeded; outputs in {job['config']['output_dir']}" in out

    thread, result = _submit_in_thread(argv)
    job = _claimed(scripted_worker)
    scripted_worker.finish(job["id"], exit_code=2, failure_class="data", failure_reason="demo.jsonl:3: not JSON")
    thread.join(30)
    assert result == {"rc": 1}
    assert f"job {job['id']} failed (data): demo.jsonl:3: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("base_model: models/tiny\ndata_path: [oops\n", "job.yaml: not valid YAML at line 3"),
    ("base_model: models/tiny\ndata_path: demo.jsonl\nlora_rnk: 4\n",
     "unknown config keys: lora_rnk (did you mean lora_rank?)"),
    ("base_model: models/tiny\ndata_path: demo.jsonl\njob:\n  gpus: '2'\n", "job.gpus"),
    ("data_path: demo.jsonl\n", "job.yaml: missing base_model"),
    ("base_model: models/tiny\ndata_path: /etc/passwd\n", "the server refused the job: 422: config.data_path"),
])
def test_a_bad_job_file_is_one_line_naming_the_line_key_or_field_and_exit_2(live_server, tmp_path, token_file,
                                                                             capsys, text, message):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(text)
    assert main(["submit", str(job_file), "--server", live_server.base_url, "--token-file", str(token_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with live_server.api() as api:
        assert api.get("/api/jobs").json()["count"] == 0


def test_a_wrong_token_or_no_server_is_said_plainly(live_server, tmp_path, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB_FILE)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    assert main(["submit", str(job_file), "--server", live_server.base_url, "--token-file", str(wrong)]) == 2
    assert "did not accept the token" in capsys.readouterr().err
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", str(job_file), "--server", nowhere, "--token-file", str(wrong)]) == 1
    assert f"The server at {nowhere} could not be reached" in capsys.readouterr().err
