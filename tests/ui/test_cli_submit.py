"""`paratrain submit`: a saved job file queued on a live server, followed to its end by its event stream."""

from __future__ import annotations

import json
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
    ("base_model: models/tiny\ndata_path: /etc/passwd\n", "the server refused the job: data_path"),
    ("base_model: models/tiny\ndata_path: demo.jsonl\njob: 0\n", "'job' must be a mapping"),
    ("base_model: models/tiny\ndata_path: demo.jsonl\nname: !!binary cGFyYQ==\n",
     "name: a bytes value; give plain text"),
    ("base_model: models/tiny\ndata_path: demo.jsonl\nmax_steps: .nan\n",
     "max_steps: nan is not a value a job can hold"),
    ("base_model: models/tiny\ndata_path: demo.jsonl\njob: {gpus: .inf}\n", "job.gpus: inf is not a value"),
    # the last of two would win silently, and train what the first line does not say
    ("base_model: models/tiny\ndata_path: demo.jsonl\nbase_model: models/other\n",
     "not valid YAML at line 3, column 1: duplicate key 'base_model' (first at line 1)"),
    ('{"base_model": "models/tiny", "data_path": "demo.jsonl", "base_model": "x"}', "duplicate key 'base_model'"),
    # a YAML merge (`<<: *defaults`) is not a duplicate: its keys may be overridden; here it brings a bad value
    ("defaults: &d {gpus: 1}\nbase_model: models/tiny\ndata_path: demo.jsonl\n<<: {lora_rank: 0}\n",
     "unknown config keys: defaults"),
    ('{\n\t"base_model": "models/tiny",\n\t"data_path": [1,\n}', "not valid JSON at line 4"),
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
    err = capsys.readouterr().err
    assert f"The server at {nowhere} could not be reached" in err and "Give its address with --server URL" in err


def test_json_with_tabs_is_a_job_file_too(live_server, tmp_path, token_file, capsys):
    job_file = tmp_path / "job.json"
    job_file.write_text('{\n\t"base_model": "models/tiny",\n\t"data_path": "demo.jsonl",\n\t"job": {"gpus": 0}\n}')
    assert main(["submit", str(job_file), "--server", live_server.base_url, "--token-file", str(token_file)]) == 0
    assert "queued" in capsys.readouterr().out


def test_the_apis_request_body_is_a_job_file_too():
    """What docs/API.md's curl lines send ({"config": {...}, "gpus": 0}) loads as the same job."""
    from trainer_core.config import parse_job_file

    body = '{"config": {"base_model": "models/tiny", "data_path": "demo.jsonl", "lora_rank": 4}, "gpus": 0}'
    assert parse_job_file(body) == ({"base_model": "models/tiny", "data_path": "demo.jsonl", "lora_rank": 4},
                                    {"gpus": 0})
    assert parse_job_file('{"config": {"base_model": "m", "data_path": "d"}}') == (
        {"base_model": "m", "data_path": "d"}, {})
    with pytest.raises(ValueError, match=r"next to 'config' .* may stand, not gpu \(did you mean gpus\?\)"):
        parse_job_file('{"config": {"base_model": "m", "data_path": "d"}, "gpu": 0}')
    with pytest.raises(ValueError, match=r"may stand, not job, lora_rank$"):   # two shapes mixed
        parse_job_file('{"config": {"base_model": "m", "data_path": "d"}, "lora_rank": 4, "job": {"gpus": 0}}')


@pytest.mark.parametrize("argv_tail,message", [
    (["--server", "http://127.0.0.1:notaport"], "not a URL"),
    (["--server", "127.0.0.1:8000"], "not an http(s) URL"),
])
def test_a_bad_server_url_is_an_argument_error(tmp_path, capsys, argv_tail, message):
    with pytest.raises(SystemExit) as stop:
        main(["submit", str(tmp_path / "job.yaml"), *argv_tail])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_token_that_is_not_one_ascii_word_is_refused_by_name(live_server, tmp_path, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB_FILE)
    for content in ("t\u00f6k\u00e9n".encode(), b"\xff\xfe", b"two words"):
        token = tmp_path / "token"
        token.write_bytes(content)
        assert main(["submit", str(job_file), "--server", live_server.base_url, "--token-file", str(token)]) == 2
        err = capsys.readouterr().err
        assert f"{token} does not hold a token" in err and "Traceback" not in err, err


class _Stream:
    """One scripted answer of httpx.stream: a status and the lines of its body."""

    def __init__(self, status: int, lines: list[str]):
        self.status_code, self._lines = status, lines

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def iter_lines(self):
        yield from self._lines

    def read(self) -> bytes:
        return "\n".join(self._lines).encode()


def test_following_reconnects_from_the_last_event_through_a_restart(monkeypatch):
    """A proxy's 503 while the server restarts, then a stream that closes before the job's end: both are
    retried, each time from the last event seen; an event's data may span several lines."""
    from paratrain import submit

    answers = [_Stream(503, ["upstream restarting"]),
               _Stream(200, [": ping", "", "id: 1", "event: metric", 'data: {"step": 1,', 'data:  "loss": 2.5}', "",
                             "id: 2", "event: state", 'data: {"state": "running", "attempt": 1}', ""]),
               _Stream(200, ["event: end", 'data: {"state": "succeeded"}', ""])]
    sent_last_ids = []

    def scripted_stream(method, url, headers, timeout):
        sent_last_ids.append(headers["Last-Event-ID"])
        return answers.pop(0)

    monkeypatch.setattr(submit.httpx, "stream", scripted_stream)
    monkeypatch.setattr(submit, "RECONNECT_WAIT_S", 0)
    events = list(submit.sse_events("http://server", "token", 1))
    assert events == [("metric", {"step": 1, "loss": 2.5}), ("state", {"state": "running", "attempt": 1}),
                      ("end", {"state": "succeeded"})]
    assert sent_last_ids == ["0", "0", "2"]


def test_following_gives_up_on_a_refusal_or_a_stream_that_never_moves(monkeypatch):
    from paratrain import submit

    monkeypatch.setattr(submit, "RECONNECT_WAIT_S", 0)
    monkeypatch.setattr(submit.httpx, "stream", lambda *a, **k: _Stream(404, ['{"detail": "job 1 not found"}']))
    with pytest.raises(submit.FollowError, match="answered 404"):
        list(submit.sse_events("http://server", "token", 1))
    calls = []
    monkeypatch.setattr(submit.httpx, "stream", lambda *a, **k: calls.append(1) or _Stream(200, [": ping", ""]))
    with pytest.raises(submit.FollowError, match="gave up after 30 tries"):
        list(submit.sse_events("http://server", "token", 1))
    assert len(calls) == 31
    monkeypatch.setattr(submit.httpx, "stream", lambda *a, **k: _Stream(200, ["event: metric", "data: oops", ""]))
    with pytest.raises(submit.FollowError, match="unreadable 'metric' event"):
        list(submit.sse_events("http://server", "token", 1))


def test_a_resumed_attempt_does_not_print_its_steps_twice(monkeypatch, capsys):
    """A later attempt re-sends the steps it brings back from the checkpoint's metrics file: printed once;
    a step it trains again to another loss is printed again."""
    from paratrain import submit

    class FakeApi:
        base_url = "http://server"

        def get_job(self, job_id):
            return {"total_steps": 3, "config": {"output_dir": "/out"}}

    events = [("state", {"state": "running", "attempt": 1}), ("metric", {"step": 1, "loss": 2.0}),
              ("metric", {"step": 2, "loss": 1.5}), ("state", {"state": "queued", "attempt": 2}),
              ("state", {"state": "running", "attempt": 2}), ("metric", {"step": 1, "loss": 2.0}),
              ("metric", {"step": 2, "loss": 1.4}), ("metric", {"step": 3, "loss": 1.2}),
              ("end", {"state": "succeeded"})]
    monkeypatch.setattr(submit, "sse_events", lambda *args: iter(events))
    assert submit.follow(FakeApi(), "token", 1) == 0
    steps = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert steps == ["step 1/3", "step 2/3", "step 2/3", "step 3/3"]


def test_a_job_that_stopped_early_says_so_at_its_end(monkeypatch, capsys):
    from paratrain import submit

    class FakeApi:
        base_url = "http://server"

        best_step = 12

        def get_job(self, job_id):
            return {"state": "succeeded", "step": 14, "total_steps": 30, "last_val_loss": 6.78,
                    "config": {"output_dir": "/out", "val_ratio": 0.1, "early_stop_patience": 2}}

        def download_artifact(self, job_id, path):
            assert path == "adapter_best/validation.json"
            return json.dumps({"step": self.best_step, "val_loss": 6.7}).encode()

    monkeypatch.setattr(submit, "sse_events", lambda *args: iter([("end", {"state": "succeeded"})]))
    assert submit.follow(FakeApi(), "token", 1) == 0
    out = capsys.readouterr().out
    assert "stopped early at step 14 of 30: 2 validations in a row without a lower loss" in out
    assert "the adapter of the lowest validation loss: /out/adapter_best/\n" in out
    FakeApi.best_step = 0   # no validation after the first beat the one before training: say what that adapter is
    assert submit.follow(FakeApi(), "token", 1) == 0
    assert "/out/adapter_best/ (before training: the adapter it started from)" in capsys.readouterr().out
    FakeApi.get_job = lambda self, job_id: {"state": "succeeded", "step": 30, "total_steps": 30,
                                            "config": {"early_stop_patience": 2}}
    assert submit.follow(FakeApi(), "token", 1) == 0
    assert "stopped early" not in capsys.readouterr().out   # it trained to its last step


def test_set_changes_fields_of_the_file_for_a_sweep(live_server, tmp_path, token_file, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(JOB_FILE)
    argv = ["submit", str(job_file), "--server", live_server.base_url, "--token-file", str(token_file)]
    for lr in ("1e-4", "3e-4"):
        assert main([*argv, "--set", f"learning_rate={lr}", "--set", "job.priority=5",
                     "--set", "lora_target_modules=q_proj,v_proj"]) == 0
    with live_server.api() as api:
        jobs = api.get("/api/jobs").json()["data"]
    assert sorted(j["config"]["learning_rate"] for j in jobs) == [1e-4, 3e-4]
    assert {(j["priority"], j["gpus"], j["config"]["lora_target_modules"]) for j in jobs} == {(5, 1, "q_proj,v_proj")}
    # a mistyped key or a bad value from --set is the --set's, not the file's
    capsys.readouterr()
    assert main([*argv, "--set", "lerning_rate=1e-4", "--set", "job.gpu=2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "paratrain submit: --set lerning_rate=1e-4: unknown config key lerning_rate (did you mean learning_rate?); "
        "--set job.gpu=2: unknown config key job.gpu (did you mean job.gpus?)")
    assert main([*argv, "--set", "val_ratio=0.9"]) == 2
    assert capsys.readouterr().err.strip() == (
        "paratrain submit: --set val_ratio=0.9: val_ratio: Input should be less than or equal to 0.5")
    assert main([*argv, "--set", "job.gpus=-1"]) == 2
    assert "paratrain submit: --set job.gpus=-1: job.gpus: Input should be greater than or equal to 0" in (
        capsys.readouterr().err)
    # a --set job.gpus does not take the blame for the file's own top-level gpus
    job_file.write_text(JOB_FILE + "gpus: 1\n")
    assert main([*argv, "--set", "job.gpus=2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"paratrain submit: {job_file}: unknown config keys: gpus (did you mean job.gpus?)")


def test_submit_finds_the_server_serve_wrote_in_the_data_dir(tmp_path, monkeypatch):
    from paratrain.submit import DEFAULT_SERVER, default_server

    monkeypatch.delenv("PARATRAIN_SERVER", raising=False)
    monkeypatch.setenv("PARATRAIN_DATA_DIR", str(tmp_path))
    assert default_server() == DEFAULT_SERVER   # no serve wrote one
    (tmp_path / "server_url").write_text("http://127.0.0.1:8917\n")
    assert default_server() == "http://127.0.0.1:8917"
    monkeypatch.setenv("PARATRAIN_SERVER", "https://paratrain.lab:443/")
    assert default_server() == "https://paratrain.lab:443"
    monkeypatch.setenv("PARATRAIN_SERVER", "ftp://x")
    with pytest.raises(ValueError, match="PARATRAIN_SERVER: not an http"):
        default_server()
