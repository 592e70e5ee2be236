"""The UI without a browser: the form derived from TrainConfig, YAML save/load, the API client against the
real server app, incremental metric polling, and the pictures/markdown the tabs render."""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from trainer_core import vram  # noqa: E402
from trainer_core.config import TrainConfig  # noqa: E402
from ui.api import ApiClient, ApiError  # noqa: E402
from ui.form import config_dict, from_yaml, job_body, to_yaml, validate  # noqa: E402


def test_form_is_derived_from_train_config():
    from ui.app import build_ui

    ui = build_ui("http://127.0.0.1:9")
    fields = ui.submit.form.fields
    assert list(fields) == [n for names in TrainConfig.fields_by_group().values() for n in names]
    for name, info in TrainConfig.model_fields.items():
        component = fields[name]
        assert component.label == name
        assert info.description.split(" ")[0] in (component.info or "")
        if not info.is_required() and info.default is not None:
            assert component.value == info.default, name
    assert ui.submit.form.job["gpus"].value == 1
    assert list(ui.submit.form.job) == ["gpus", "nproc", "nodes", "priority", "max_attempts"]   # JobResources
    # the demo `paratrain serve` creates, named where the form starts empty
    assert "models/tiny-qwen2" in fields["base_model"].placeholder
    assert "datasets/demo.jsonl" in fields["data_path"].placeholder
    assert "(required)" in fields["data_path"].info and "(required)" not in fields["lora_rank"].info
    # groups are rendered as the schema groups them, under the guide's titles
    config = ui.blocks.get_config_file()
    labels = {c["props"].get("label") for c in config["components"] if c["type"] == "accordion"}
    assert {"Model", "Data", "Training", "Output", "Resources"} <= labels


def test_form_values_round_trip_through_yaml():
    values = {name: (info.default if not info.is_required() else None) for name, info in TrainConfig.model_fields.items()}
    values.update(base_model="models/tiny", data_path="datasets/demo.jsonl", lora_rank=16.0, max_steps=None,
                  gpus=2, nodes=1, priority=3, nproc="", max_attempts="5")
    config, error = validate(values)
    assert error == "" and config.lora_rank == 16 and isinstance(config.lora_rank, int)
    body = job_body(values, config)
    assert body["gpus"] == 2 and body["priority"] == 3 and body["config"]["base_model"] == "models/tiny"
    assert body["max_attempts"] == 5 and "nproc" not in body   # an empty input: the server's default
    loaded = from_yaml(to_yaml(values))
    assert loaded["lora_rank"] == 16 and loaded["gpus"] == 2 and loaded["max_steps"] is None
    assert loaded["max_attempts"] == 5 and "nproc" not in loaded
    assert TrainConfig(**config_dict(loaded)) == config


def test_form_validation_names_the_field():
    config, error = validate({"base_model": "", "data_path": "d.jsonl", "lora_rank": 0})
    assert config is None and "base_model" in error and "lora_rank" in error
    with pytest.raises(ValueError, match="unknown config keys: lora_rnak"):
        from_yaml("base_model: m\ndata_path: d\nlora_rnak: 8\n")
    # a saved file with a bad value or bad YAML names the problem; the form is never filled with it
    with pytest.raises(ValueError, match="batch_size: Input should be a valid integer"):
        from_yaml("batch_size: lots\n")
    with pytest.raises(ValueError, match="not valid YAML at line 2, column 1: expected .,. or .]."):
        from_yaml("base_model: [models/tiny\n")
    with pytest.raises(ValueError, match="job.gpus: Input should be a valid integer"):
        from_yaml("lora_rank: 4\njob: {gpus: two}\n")
    with pytest.raises(ValueError, match="job.max_attempts: Input should be less than or equal to 100"):
        from_yaml("job: {max_attempts: 1000}\n")
    config, error = validate({"base_model": "m", "data_path": "d", "nodes": 0.0}, with_job=True)
    assert config is None and error == "nodes: Input should be greater than or equal to 1"
    assert from_yaml("lora_rank: 4\n")["lora_rank"] == 4      # base_model/data_path may be left out
    # the form never runs a value it does not show: 2.5 for an int is refused, not rounded; an emptied input
    # is named, not silently replaced by the default
    from ui.form import component_for

    assert component_for("lora_rank", TrainConfig.model_fields["lora_rank"]).preprocess(2.5) == 2.5
    config, error = validate({"base_model": "m", "data_path": "d", "lora_rank": 2.5})
    assert config is None and error == "lora_rank: Input should be a valid integer, got a number with a fractional part"
    config, error = validate({"base_model": "m", "data_path": "d", "learning_rate": None, "epochs": 2, "gpus": ""},
                             with_job=True)
    assert config is None and error == ("learning_rate: empty; enter a value (the default is 0.0001); "
                                        "gpus: empty; enter a value (the default is 1)")
    config, error = validate({"base_model": "m", "data_path": "d", "name": "my first run"})   # in words, not a regex
    assert error == ("name: letters, digits, '.', '_' and '-' only, no spaces, not starting with '.' (it is part of "
                     "the output file names), e.g. my-first-run")
    assert validate({"base_model": "m", "data_path": "d", "name": ".hidden"})[0] is None   # lora/.hidden_*.pth
    assert validate({"base_model": "m", "data_path": "d", "name": "run.2"})[0].name == "run.2"


def test_float_inputs_step_by_a_tenth_of_their_default():
    """The spinner arrows nudge a float: a learning rate of 1e-4 moves by 1e-5, not by Gradio's default 1."""
    from ui.form import component_for

    def step(name):
        return component_for(name, TrainConfig.model_fields[name]).step

    assert step("learning_rate") == pytest.approx(1e-5)
    assert step("rope_2d_ratio") == pytest.approx(0.01)     # default 0.5
    assert step("max_grad_norm") == pytest.approx(0.1)      # default 1.0
    assert step("lora_dropout") == pytest.approx(0.01)      # default 0: the step of a share
    assert step("lora_rank") == 1                           # ints keep whole steps


def test_api_client_against_real_server(live_server):
    with pytest.raises(ApiError) as wrong:
        ApiClient(live_server.base_url, "not-the-token").check_token()
    assert wrong.value.status == 401 and "token" in str(wrong.value)
    assert "not-the-token" not in repr(ApiClient(live_server.base_url, "not-the-token"))
    client = ApiClient(live_server.base_url, live_server.token)
    client.check_token()
    with pytest.raises(ApiError) as unreachable:
        ApiClient("http://127.0.0.1:9", "t").check_token()
    assert unreachable.value.status == 0
    job = client.submit_job({"config": {"base_model": "models/tiny", "data_path": "demo.jsonl", "max_steps": 3},
                             "gpus": 0})
    assert job["state"] == "queued"
    assert client.list_jobs()[0]["id"] == job["id"]
    argv = client.command_preview({"config": job["config"], "gpus": 2})
    assert "trainer_core.train" in argv and "--max_steps" in argv
    with pytest.raises(ApiError) as invalid:
        client.submit_job({"config": {"base_model": "m", "data_path": "d", "lora_rank": 0}})
    assert invalid.value.status == 422 and "lora_rank" in str(invalid.value)
    assert client.cancel_job(job["id"])["state"] == "cancelled"
    retried = client.retry_job(job["id"])
    assert retried["retry_of"] == job["id"]


def test_ui_is_mounted_and_root_redirects(live_server):
    r = httpx.get(f"{live_server.base_url}/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"].startswith("/ui")
    page = httpx.get(f"{live_server.base_url}/ui/", follow_redirects=True)
    assert page.status_code == 200 and "paratrain" in page.text


def test_metrics_polling_is_incremental_and_complete(live_server, scripted_worker):
    from ui.tabs.jobs import curve_frame, empty_watch, fetch_new, table_rows

    client = ApiClient(live_server.base_url, live_server.token)
    job = client.submit_job({"config": {"base_model": "models/tiny", "data_path": "demo.jsonl"}, "gpus": 1})
    assert scripted_worker.claim()["id"] == job["id"]
    scripted_worker.report(job["id"], range(1, 4))
    watch = empty_watch() | {"job_id": job["id"]}
    assert fetch_new(client, watch) == (True, True)
    assert [p["step"] for p in watch["points"]] == [1, 2, 3] and watch["log_lines"][-1] == "step 3 loss 3.846"
    assert fetch_new(client, watch) == (False, False)  # nothing new: nothing re-sent
    scripted_worker.report(job["id"], range(4, 6))
    assert fetch_new(client, watch) == (True, True)
    assert [p["step"] for p in watch["points"]] == [1, 2, 3, 4, 5]
    # a reload starts from nothing and gets the whole curve back
    again = empty_watch() | {"job_id": job["id"]}
    fetch_new(client, again)
    assert again["points"] == watch["points"] and again["log_lines"] == watch["log_lines"]
    frame = curve_frame(again["points"], "loss")
    assert list(frame.columns) == ["step", "loss"] and len(frame) == 5
    row = table_rows([client.get_job(job["id"])])[0]
    assert row[0] == job["id"] and "running" in row[2] and row[3].startswith("5/100")


def test_the_summary_names_the_trainers_best_adapter_not_the_lowest_point(live_server, scripted_worker):
    """adapter_best/validation.json is the trainer's record: after a resume on another validation file its
    step is not the lowest point of the curve, so the UI reads it instead of recomputing it."""
    from pathlib import Path

    from ui.tabs.jobs import empty_watch, fetch_new, job_summary

    client = ApiClient(live_server.base_url, live_server.token)
    job = client.submit_job({"config": {"base_model": "models/tiny", "data_path": "demo.jsonl", "val_ratio": 0.2},
                             "gpus": 1})
    assert scripted_worker.claim()["id"] == job["id"]
    scripted_worker.report(job["id"], range(1, 5), val_every=2)   # val_loss falls: lowest at step 4
    watch = empty_watch() | {"job_id": job["id"]}
    fetch_new(client, watch)
    assert watch["best"] is None   # no adapter_best/ yet
    best = Path(job["config"]["output_dir"]) / "adapter_best"
    best.mkdir(parents=True)
    (best / "validation.json").write_text(json.dumps({"step": 2, "val_loss": 5.1, "val_set": "x"}))
    scripted_worker.report(job["id"], range(5, 7), val_every=2)
    fetch_new(client, watch)
    assert watch["best"] == (2, 5.1)
    summary = job_summary(client.get_job(job["id"]), best=watch["best"])
    assert "(lowest 5.1000 at step 2: `adapter_best/`)" in summary
    # `paratrain jobs show` names it too (it showed the last validation loss only)
    from paratrain.jobs import job_text

    assert f"lowest validation loss 5.1000 at step 2: {best}/" in job_text(client.get_job(job["id"]),
                                                                          client.best_adapter(job["id"]))


def test_layout_picture_draws_branches_as_rows_and_time_as_columns():
    import torch

    from trainer_core.layout import build_sample_layout
    from ui.tabs.dataset import layout_svg

    lay = build_sample_layout(torch.arange(3), [torch.arange(4), torch.arange(2)], branch_stride=128)
    svg = layout_svg({"time_ids": lay.time_ids.tolist(), "branch_index": (lay.branch_pos // 128).tolist(),
                      "has_main": True})
    assert svg.count("<rect ") == 3 + 4 + 2
    assert "main" in svg and "branch 1" in svg and "branch 2" in svg and "7 time steps" in svg
    assert "No example" in layout_svg(None)


def test_estimate_markdown_shows_breakdown_and_warning():
    from ui.tabs.memory import estimate_markdown

    text = estimate_markdown(vram.estimate(TrainConfig(base_model="0.5B", data_path="d", batch_size=64), 24))
    assert "does not fit" in text and "model weights" in text and "⚠" in text
    assert "(0.49B params" in text
    rows = vram.preset_rows(vram.presets(24, "1.5B"))
    assert len(rows) == 3 and all(r[-1] == "yes" for r in rows)


def test_the_estimate_of_a_tiny_model_counts_its_parameters_in_millions(tiny_model_dir):
    from ui.tabs.memory import estimate_markdown

    est = vram.estimate(TrainConfig(base_model=str(tiny_model_dir), data_path="d"), 24)
    assert f"({est['model']['params'] / 1e6:.1f}M params, from config.json)" in estimate_markdown(est)   # not 0.0B


def test_dataset_tab_renders_the_real_check_summary(tiny_model_dir, demo_data_path):
    from trainer_core.data_cli import summarize
    from ui.tabs.dataset import histogram_frame, layout_svg, summary_markdown

    summary = summarize(TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path),
                                    max_branches_per_sample=6))
    text = summary_markdown(summary)
    assert "The data is valid" in text and "padding share" in text and "p50 / p90" in text and "⚠" not in text
    checked = {"data_path": "datasets/d.jsonl", "base_model": "models/m", "max_branches_per_sample": 6}
    assert "`datasets/d.jsonl`, tokenized by `models/m` (max_seq_len 1024, 1-6 texts per sample)" in \
        summary_markdown(summary, {**checked, "seed": 3})
    warned = summary_markdown({**summary, "warnings": ["d.jsonl: 1 record has keys paratrain ignores: lable"]})
    assert "⚠ d.jsonl: 1 record has keys paratrain ignores: lable" in warned
    frame = histogram_frame(summary)
    assert frame["samples"].sum() == summary["samples"]
    svg = layout_svg(summary["example_layout"])
    assert svg.count("<rect ") == len(summary["example_layout"]["time_ids"]) and "<title>time 0" in svg


def test_the_dataset_check_sends_the_forms_fields_that_shape_samples_and_only_those():
    """batch_size and branch_stride live outside the form's "data" group; the check once left them out and
    summarised batches of the default size."""
    from ui.tabs.dataset import check_body

    values = {name: info.default for name, info in TrainConfig.model_fields.items() if not info.is_required()}
    values.update(base_model="models/tiny", data_path="d.jsonl", batch_size=7.0, branch_stride=64.0, seed=3.0,
                  batch_by_samples=True, learning_rate=123.0)   # an invalid field the check must not send
    body = check_body(values)
    assert body["batch_size"] == 7 and body["branch_stride"] == 64 and body["seed"] == 3 and body["batch_by_samples"]
    assert body["data_path"] == "d.jsonl" and body["base_model"] == "models/tiny" and "learning_rate" not in body


def test_estimate_is_corrected_by_jobs_measured_on_a_gpu(live_server, scripted_worker):
    from ui.tabs.memory import estimate_markdown, measured_peaks
    from ui.workers import largest_gpu_gb

    client = ApiClient(live_server.base_url, live_server.token)
    assert largest_gpu_gb(client.workers()) == 24.0  # what the scripted worker registered
    config = {"base_model": "models/tiny", "data_path": "demo.jsonl", "max_seq_len": 64, "batch_size": 2}
    before = client.estimate(config, 24, measured_peaks(client))
    assert before["correction"] is None
    job = client.submit_job({"config": config, "gpus": 1})
    scripted_worker.claim()
    scripted_worker.report(job["id"], range(1, 3))  # the trainer's gpu_mem_gb: 3.5
    scripted_worker.finish(job["id"])
    measured = measured_peaks(client)
    assert measured and measured[0]["peak_mem_gb"] == pytest.approx(3.5)
    after = client.estimate(config, 24, measured)
    assert after["correction"]["jobs"] == 1 and after["correction"]["basis"] == "same model"
    assert after["peak_gb"] != before["peak_gb"]
    assert "Corrected by measured peaks of 1 job" in estimate_markdown(after)


TRACEBACK = """exit code 1
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "<frozen runpy>", line 88, in _run_code
""" + "".join(f'  File "/srv/trainer_core/train.py", line {i}, in step\n    loss = run(batch)\n' for i in range(20)) + """
ValueError: data_path: line 7 has no "text" or "main"
"""


def test_failure_summary_shows_the_cause_at_the_end_of_a_traceback():
    from ui.jobtext import state_text
    from ui.tabs.jobs import job_summary

    job = {"id": 3, "name": "x", "state": "failed", "config": {}, "failure_class": "crash",
           "failure_reason": TRACEBACK}
    text = job_summary(job)
    assert 'ValueError: data_path: line 7 has no "text" or "main"' in text  # the cause, at the very end
    assert "exit code 1" in text  # the worker's headline, its first line
    assert "lines not shown" in text and text.count("loss = run(batch)") < 20  # long: the middle is left out
    # verbatim: in a code fence, so `<frozen runpy>` is not taken for an HTML tag that hides the rest
    fence_start = text.index("```")
    assert fence_start < text.index("ValueError") < text.rindex("```")
    assert "ETA**" not in job_summary({**job, "eta_s": 104.0})  # the last report's ETA of a job that ended
    queued = job_summary({"id": 9, "state": "queued", "config": {}, "gpus": 1, "attempt": 1, "max_attempts": 3})
    assert "**GPU** 1 wanted · **attempt** 1/3" in queued and "progress" not in queued and " -" not in queued
    short = job_summary({**job, "failure_reason": "exit code 2\n\nbad config", "failure_class": "data"})
    assert "exit code 2\nbad config" in short and "not shown" not in short
    assert "**Failed: bad data or settings (below): the same job fails the same way;" in short   # what to do next
    # a divergence is of class data too, but Retry keeps the learning rate that diverged
    diverged = job_summary({**job, "failure_class": "data", "exit_code": 4,
                            "failure_reason": "paratrain: training diverged at step 3: loss nan"})
    assert "**Failed: the training diverged (a NaN or infinite loss): *Edit as new job* with a lower learning_rate" \
        in diverged and "*Retry* would diverge again" in diverged
    # the jobs table's state column says why a job failed
    assert state_text({**job, "state": "failed", "failure_class": "data", "exit_code": 4}) == "✖ failed (diverged)"
    assert state_text({**job, "state": "failed", "failure_class": "oom", "exit_code": 3}) == "✖ failed (oom)"
    assert state_text({**job, "state": "cancelled"}) == "■ cancelled"   # its failure_class says cancelled again


def test_job_summary_says_when_it_was_queued_started_and_how_long_it_ran():
    from ui.tabs.jobs import job_summary

    job = {"id": 3, "name": "x", "state": "succeeded", "config": {}, "created_at": "2026-11-29T10:02:11.5",
           "started_at": "2026-11-29T10:02:15", "finished_at": "2026-11-29T11:03:20Z"}
    assert "queued 2026-11-29 10:02:11 UTC · started 10:02:15 · ended 11:03:20 · ran 1:01:05" in job_summary(job)
    overnight = job_summary({**job, "finished_at": "2026-11-30T01:00:00"})
    assert "ended 2026-11-30 01:00:00 · ran 14:57:45" in overnight
    assert "**Failed.**" in job_summary({**job, "state": "failed", "failure_reason": "exit code 1"})
    assert "started" not in job_summary({**job, "started_at": None, "finished_at": None, "state": "queued"})


def test_a_job_that_stopped_early_says_so_in_its_summary_and_progress():
    from ui.jobtext import progress_text
    from ui.tabs.jobs import eta_text, job_summary

    job = {"id": 4, "name": "x", "state": "succeeded", "step": 14, "total_steps": 30, "last_val_loss": 6.78,
           "config": {"val_ratio": 0.1, "early_stop_patience": 2}}
    assert progress_text(job) == "14/30 (stopped early)"
    running = {**job, "state": "running", "eta_s": 100.0}
    assert eta_text(running) == "≤ 1:40"   # it may stop sooner
    assert eta_text({**running, "config": {"val_ratio": 0.1}}) == "1:40"
    text = job_summary(job, best=(12, 6.7804))
    assert "validation 10% held out, early stop after 2 validations without a lower loss" in text
    assert "**Stopped early** at step 14 of 30: 2 validations in a row without a lower loss" in text
    text = job_summary({**job, "config": {**job["config"], "early_stop_min_delta": 0.01}})
    assert "early stop after 2 validations without a loss lower by more than 0.01" in text
    assert "2 validations in a row without a loss lower by more than 0.01" in text
    assert "**outputs** `/data/jobs/4/out`" in job_summary({**job, "config": {**job["config"],
                                                                            "output_dir": "/data/jobs/4/out"}})
    # still running at step 14, or ended at its last step, or without a patience: not stopped early
    for other in ({"state": "running"}, {"step": 30}, {"config": {"val_ratio": 0.1}}):
        assert "Stopped early" not in job_summary({**job, **other})
        assert "stopped early" not in progress_text({**job, **other})


def test_ui_api_calls_do_not_flood_the_server_log(caplog):
    import logging

    from ui.app import build_ui

    build_ui("http://127.0.0.1:9")  # what the server's mount does
    ok = httpx.MockTransport(lambda request: httpx.Response(200, json={"data": [], "count": 0}))
    with caplog.at_level(logging.INFO):  # `paratrain serve` logs at INFO
        ApiClient("http://paratrain.test", "token", transport=ok).list_jobs()
    assert not [r for r in caplog.records if r.name.startswith("httpx")]


def test_a_refused_request_reads_as_the_form_names_its_fields():
    """'data_path: ...', not '422: config.data_path: ...'; a server error still says it is one."""
    from ui.api import ApiError

    answers = {"/api/jobs": httpx.Response(422, json={"detail": [
                   {"loc": ["body", "config", "data_path"], "msg": "no such file under the data root"},
                   {"loc": ["body", "gpus"], "msg": "Input should be >= 0"}]}),
               "/api/jobs/7/cancel": httpx.Response(409, json={"detail": "job 7 is succeeded"}),
               "/api/jobs/7/retry": httpx.Response(503, json={"detail": "the disk is full"}),
               "/api/jobs/7": httpx.Response(404, text="Not Found"),
               "/api/command-preview": httpx.Response(422, json={"detail": [{"loc": ["body", "config"],
                                                                             "msg": "Field required"}]})}
    api = ApiClient("http://paratrain.test", "token",
                    transport=httpx.MockTransport(lambda request: answers[request.url.path]))
    messages = []
    for call in (lambda: api.submit_job({}), lambda: api.cancel_job(7), lambda: api.retry_job(7),
                 lambda: api.get_job(7), lambda: api.command_preview({})):
        with pytest.raises(ApiError) as refused:
            call()
        messages.append(str(refused.value))
    assert messages == ["data_path: no such file under the data root; gpus: Input should be >= 0",
                        "job 7 is succeeded", "server error 503: the disk is full",
                        "404 Not Found",   # no detail of the server's: the status says what happened
                        "config: Field required"]


def test_branches_histogram_is_in_numeric_order():
    from ui.tabs.dataset import histogram_update

    # as the check's JSON has it: string keys, which sort as text ("10" < "2")
    summary = {"branches_histogram": {"17": 26, "10": 1, "2": 5, "3": 8, "9": 6, "11": 3}}
    update = histogram_update(summary)
    expected = [str(n) for n in range(2, 18)]
    assert list(update["value"]["branches"]) == expected
    assert update["sort"] == expected  # the plot's x axis follows it instead of sorting the labels as text
    samples = dict(zip(update["value"]["branches"], update["value"]["samples"]))
    assert samples["17"] == 26 and samples["2"] == 5 and samples["5"] == 0  # a count no sample has: an empty bar


def _svg_row_of_rects(svg: str) -> list[float]:
    return [float(y) for y in re.findall(r'<rect x="[\d.]+" y="([\d.]+)"', svg)]


def test_layout_picture_shows_branches_of_a_long_main_through_a_window():
    from ui.tabs.dataset import layout_svg

    # an example holding the main's first 4 steps and the first steps of its branches, which start at 200
    layout = {"has_main": True, "columns_total": 260, "time_ids": [0, 1, 2, 3, 200, 200, 201, 201, 202, 203],
              "branch_index": [0, 0, 0, 0, 1, 2, 1, 2, 1, 1], "tokens": list("abcdefghij")}
    svg = layout_svg(layout)
    assert svg.count("<rect ") == 10 and "branch 1" in svg and "branch 2" in svg
    assert len(set(_svg_row_of_rects(svg))) == 3  # main and two branch rows are drawn
    assert "time steps 4–199 not shown" in svg and "⋯" in svg and ">200</text>" in svg
    assert "(10 tokens, 3 rows, 260 time steps)" in svg
    # the server sends only the first steps of each row: the caption counts the whole sample's tokens
    assert "(10 of 480 tokens shown, 3 rows, 260 time steps)" in layout_svg({**layout, "tokens_total": 480})
    width = float(re.search(r'<svg [^>]*width="([\d.]+)"', svg).group(1))
    assert width < 300  # the left-out steps take one column, not 196


def test_layout_picture_says_why_a_main_only_example_has_no_branch():
    from ui.tabs.dataset import layout_svg

    svg = layout_svg({"has_main": True, "columns_total": 317, "time_ids": list(range(48)), "branch_index": [0] * 48})
    assert "48 of 317 time steps shown" in svg and "branches start after the main" in svg


def test_presets_table_has_a_column_per_preset_verdict_first():
    from ui.tabs.memory import presets_frame

    plist = vram.presets(24, "0.5B")
    frame = presets_frame(plist)
    # three presets side by side fit beside the form; eleven setting columns did not
    assert list(frame.columns) == ["setting"] + [p["name"] for p in plist]
    assert list(frame["setting"][:2]) == ["peak GB", "fits"]
    first = plist[0]
    column = dict(zip(frame["setting"], frame[first["name"]]))
    assert column["fits"] == "yes" and float(column["peak GB"]) == pytest.approx(first["estimate"]["peak_gb"], abs=0.01)
    assert column["rank"] == str(first["config"]["lora_rank"])



CPU_WORKER = {"id": 1, "name": "box-local", "gpus": [], "online": True}
GPU_WORKER = {"id": 2, "name": "gpu-box", "gpus": [{"index": i, "name": "H100", "memory_gb": 80.0} for i in range(2)],
              "online": True}


def test_what_the_workers_mean_for_a_job():
    from ui.workers import capacity_warning, cpu_only, gpu_worker_online

    assert cpu_only([CPU_WORKER]) and not cpu_only([CPU_WORKER, GPU_WORKER])
    assert not cpu_only([])  # nothing registered yet: nothing to conclude
    assert not gpu_worker_online([CPU_WORKER, {**GPU_WORKER, "online": False}])
    assert capacity_warning([CPU_WORKER], gpus=0) is None
    assert "No online worker has 1 GPU (the most is 0)" in capacity_warning([CPU_WORKER], gpus=1)
    assert capacity_warning([CPU_WORKER, GPU_WORKER], gpus=2) is None
    assert "the most is 2" in capacity_warning([GPU_WORKER], gpus=4)
    assert "No online worker has" in capacity_warning([CPU_WORKER, {**GPU_WORKER, "online": False}], gpus=1)
    assert "No worker is online" in capacity_warning([], gpus=0)
    assert "No worker is online" in capacity_warning([{**CPU_WORKER, "stopping": True}], gpus=0)
    assert "spans 2 workers" in capacity_warning([CPU_WORKER, GPU_WORKER], gpus=1, nodes=2)


def test_memory_panel_on_a_cpu_only_setup_says_no_gpu_worker_is_online():
    from ui.tabs.memory import DEFAULT_GPU_MEM_GB, estimate_markdown, gpu_mem_update

    est = vram.estimate(TrainConfig(base_model="0.5B", data_path="d"), DEFAULT_GPU_MEM_GB)
    assert est["fits"]
    cpu_text = estimate_markdown(est, gpu_worker_online=False)
    assert "No GPU worker online" in cpu_text and "would fit a GPU of 80 GB" in cpu_text
    assert ": fits" not in cpu_text
    assert "No GPU worker" not in estimate_markdown(est) and ": fits" in estimate_markdown(est)
    update = gpu_mem_update([CPU_WORKER])
    assert update["value"] == DEFAULT_GPU_MEM_GB and "No worker reports a GPU" in update["info"]
    assert gpu_mem_update([CPU_WORKER, GPU_WORKER])["value"] == 80.0


def test_job_actions_follow_the_jobs_state():
    from ui.tabs.jobs import action_updates, job_actions

    # (cancel, retry, download adapter)
    assert job_actions({"state": "queued"}) == (True, False, False)
    assert job_actions({"state": "running"}) == (True, False, False)
    assert job_actions({"state": "running", "cancel_requested": True}) == (False, False, False)
    assert job_actions({"state": "succeeded"}) == (False, False, True)  # cancelling it was a 409
    assert job_actions({"state": "failed"}) == (False, True, False)
    assert job_actions({"state": "cancelled"}) == (False, True, False)
    assert job_actions({"state": "failed", "retried_as": 7}) == (False, False, False)   # the server would 409
    # stopped after a validation: its adapter_best/ is there to download
    assert job_actions({"state": "cancelled", "last_val_loss": 6.8}) == (False, True, True)
    # + Edit as new job, for any job, and Train on from adapter, for a job with an adapter
    assert [u["interactive"] for u in action_updates(None)] == [False, False, False, False, False]
    assert [u["interactive"] for u in action_updates({"state": "running"})] == [True, False, False, True, False]
    assert [u["interactive"] for u in action_updates({"state": "succeeded"})] == [False, False, True, True, True]


def test_train_on_starts_from_the_adapter_of_the_lowest_validation_loss_when_there_is_one():
    from ui.tabs.jobs import train_on_values

    job = {"id": 3, "state": "succeeded", "step": 30, "gpus": 0, "nodes": 1, "priority": 0, "max_attempts": 3,
           "config": {"base_model": "/d/models/tiny", "data_path": "/d/a.jsonl", "output_dir": "/d/jobs/3/out",
                      "lora_rank": 16}}
    values, which = train_on_values(job, None)   # no validation set
    assert (values["init_adapter"], which) == ("/d/jobs/3/out/adapter", "adapter/ (its last step, 30)")
    assert values["lora_rank"] == 16 and values["data_path"] == "/d/a.jsonl"   # the settings the adapter needs
    assert values["output_dir"] != "/d/jobs/3/out"   # the server chooses the new job's
    values, which = train_on_values({**job, "last_val_loss": 6.1}, (20, 6.05))
    assert (values["init_adapter"], which) == ("/d/jobs/3/out/adapter_best",
                                               "adapter_best/ (step 20, validation loss 6.0500)")
    # its lowest was before training (adapter_best/ is the untrained adapter): the last step's, when it has one
    assert train_on_values(job, (0, 7.3))[0]["init_adapter"] == "/d/jobs/3/out/adapter"
    values, which = train_on_values({**job, "state": "cancelled"}, (0, 7.3))   # no adapter/: said
    assert values["init_adapter"] == "/d/jobs/3/out/adapter_best" and "before training" in which


def test_jobs_table_shows_about_ten_jobs_before_it_scrolls():
    from ui.app import build_ui

    assert build_ui("http://127.0.0.1:9").jobs.table.max_height >= 10 * 35 + 40


def test_workers_table_states_gpus_and_ages():
    from datetime import datetime, timezone

    from ui.tabs.workers import summary_text, table_rows

    now = datetime(2026, 11, 28, 12, 0, 30, tzinfo=timezone.utc)
    h100 = {"index": 0, "name": "H100", "memory_gb": 79.6}
    workers = [
        {"name": "b-off", "hostname": "b", "online": False, "stopping": False, "gpus": [],
         "running_job_ids": [], "last_heartbeat_at": "2026-11-28T11:58:00Z"},
        {"name": "c-drain", "hostname": "c", "online": True, "stopping": True, "gpus": [h100],
         "running_job_ids": [7], "last_heartbeat_at": "2026-11-28T12:00:28Z"},
        {"name": "a-on", "hostname": "a", "online": True, "stopping": False, "gpus": [h100, {**h100, "index": 1}],
         "running_job_ids": [3, 4], "last_heartbeat_at": "2026-11-28T12:00:29.5Z"},
    ]
    rows = table_rows(workers, now)
    assert [r[0] for r in rows] == ["a-on", "c-drain", "b-off"]          # online, stopping, offline
    assert rows[0][2:] == ["● online", "2 × H100 (79.6 GB)", "#3, #4", "0 s ago"]
    assert rows[1][5] == "2 s ago"
    assert rows[1][2] == "◐ stopping" and rows[2][2:4] == ["○ offline", "CPU only"]
    assert rows[2][5] == "2:30 ago"
    assert summary_text(workers).startswith("2 of 3 workers online, 3 GPUs among them")
    assert "No worker has registered yet" in summary_text([])


def test_live_plot_titles_carry_the_last_point():
    from ui.tabs.jobs import curve_title

    points = [{"step": 1, "loss": 7.3, "lr": 0.003}, {"step": 2, "loss": 7.25, "lr": None}]
    assert curve_title(points, "loss", "Loss") == "Loss (step 2: 7.25)"
    assert curve_title(points, "lr", "Learning rate") == "Learning rate (step 1: 0.003)"
    assert curve_title([], "loss", "Loss") == "Loss"


def test_the_loss_plot_draws_the_validation_loss_beside_the_training_loss():
    from ui.tabs.jobs import job_summary, last_validation_step, loss_frame, loss_title, step_axis

    points = [{"step": 0, "loss": None, "val_loss": 7.4}, {"step": 1, "loss": 7.3}, {"step": 2, "loss": 7.25},
              {"step": 3, "loss": 7.1, "val_loss": 7.2}, {"step": 4, "loss": 7.0}]
    frame = loss_frame(points)
    by_curve = {curve: list(zip(part["step"], part["loss"])) for curve, part in frame.groupby("curve")}
    assert by_curve == {"training": [(1, 7.3), (2, 7.25), (3, 7.1), (4, 7.0)], "validation": [(0, 7.4), (3, 7.2)]}
    assert str(frame["step"].dtype) == "int64" and str(frame["loss"].dtype) == "float64"
    assert loss_title(points) == "Loss (step 4: 7; validation at step 3: 7.2)"
    assert loss_title(points[:1]) == "Loss (validation at step 0: 7.4)"
    assert loss_title(points[1:3]) == "Loss (step 2: 7.25)"
    assert step_axis(points)[0] == 0 and step_axis(points[1:])[0] == 1   # step 0 is on the axis when drawn
    job = {"id": 3, "state": "running", "config": {"val_ratio": 0.05}, "last_loss": 7.0, "last_val_loss": 7.2}
    assert "validation 5% held out" in job_summary(job) and "**validation loss** 7.2000 ·" in job_summary(job)
    assert "**validation loss** 7.2000 (lowest 7.2000 at step 3: `adapter_best/`)" in job_summary(job, best=(3, 7.2))
    assert "**validation loss** 7.2000 at step 3 ·" in job_summary(job, val_step=last_validation_step(points))
    # the lowest before training: adapter_best/ is the untrained adapter, which the summary says
    assert "at step 0, before training: `adapter_best/` is the adapter it started from" in job_summary(job, best=(0, 7.4))
    assert "LoRA from `/d/jobs/1/out/adapter`" in job_summary({**job, "config": {"init_adapter": "/d/jobs/1/out/adapter"}})
    job["config"] = {"val_data_path": "/data/val.jsonl"}
    assert "validation /data/val.jsonl" in job_summary(job)
    assert "validation" not in job_summary({"id": 4, "state": "queued", "config": {}})


def _layers_by_series(chart) -> dict[str, dict]:
    """{series name: the mark of the Vega-Lite layer that draws it} of a ui.charts.curve_chart."""
    spec = json.loads(chart.plot)
    return {name: layer["mark"] for layer in spec["layer"] for name in layer["transform"][0]["filter"]["oneOf"]}


def test_validation_losses_are_dots_from_the_first_one_on_and_the_training_loss_a_line():
    """gr.LinePlot drew no validation loss while it had one point (step 0, before training): a line needs two."""
    from ui.tabs.jobs import loss_chart, loss_title, step_axis

    before_training = [{"step": 0, "loss": None, "val_loss": 7.4}]
    chart = loss_chart(before_training)
    spec = json.loads(chart.plot)
    assert chart.type == "altair"   # what gr.Plot's frontend draws with vega-embed
    assert spec["data"]["values"] == [{"step": 0, "loss": 7.4, "curve": "validation"}]
    dot = _layers_by_series(chart)["validation"]["point"]
    assert dot["filled"] and dot["size"] >= 30 and dot["opacity"] == 1
    assert spec["encoding"]["color"]["scale"] == {"domain": ["validation"], "range": ["#e11d48"]}  # legend: drawn only
    assert spec["title"] == loss_title(before_training) == "Loss (validation at step 0: 7.4)"
    assert spec["encoding"]["x"]["scale"]["domain"] == step_axis(before_training) == [0, 10]

    points = before_training + [{"step": s, "loss": 7.3 - 0.1 * s} for s in range(1, 13)] + [
        {"step": 13, "loss": 6.0, "val_loss": 7.0}]
    spec = json.loads(loss_chart(points).plot)
    marks = _layers_by_series(loss_chart(points))
    assert marks["training"] == {"type": "line", "point": "transparent"}   # a line; its dots only for the tooltip
    assert marks["validation"]["type"] == "line" and marks["validation"]["point"]["opacity"] == 1
    assert spec["encoding"]["color"]["scale"]["domain"] == ["training", "validation"]
    assert spec["encoding"]["x"]["scale"]["domain"] == step_axis(points) == [0, 13]
    assert len(spec["data"]["values"]) == 13 + 2
    empty = json.loads(loss_chart([]).plot)
    assert empty["data"]["values"] == []   # no job (or no step yet): an empty chart, not an error
    assert empty["encoding"]["color"]["legend"] is None   # an empty legend collapsed the chart to a strip


def test_the_learning_rate_chart_shares_the_loss_charts_step_axis_and_has_no_legend():
    from ui.tabs.jobs import loss_chart, lr_chart

    points = [{"step": 0, "loss": None, "val_loss": 7.4}] + [{"step": s, "loss": 7.0, "lr": 1e-4 * s} for s in (1, 2)]
    spec, loss_spec = json.loads(lr_chart(points).plot), json.loads(loss_chart(points).plot)
    assert spec["title"] == "Learning rate (step 2: 0.0002)"
    assert [v["lr"] for v in spec["data"]["values"]] == [1e-4, 2e-4]   # step 0 has no learning rate
    assert spec["encoding"]["x"]["scale"]["domain"] == loss_spec["encoding"]["x"]["scale"]["domain"] == [0, 10]
    assert spec["encoding"]["color"]["legend"] is None and loss_spec["encoding"]["color"]["legend"]


def test_the_compare_chart_dots_validation_losses_only():
    import pandas as pd

    from ui.tabs.compare import PALETTE, compare_chart

    frame = pd.DataFrame([(0, 7.4, "#1 a"), (0, 7.1, "#2 b"), (10, 6.9, "#2 b")], columns=["step", "loss", "job"])
    chart = compare_chart(frame, "val_loss")
    spec = json.loads(chart.plot)
    assert spec["title"] == "Validation loss of 2 jobs"
    assert spec["encoding"]["color"]["scale"] == {"domain": ["#1 a", "#2 b"], "range": PALETTE[:2]}
    assert all(mark["point"]["opacity"] == 1 for mark in _layers_by_series(chart).values())   # #1's one point too
    assert all(mark["point"] == "transparent" for mark in _layers_by_series(compare_chart(frame, "loss")).values())
    assert "x" in spec["encoding"] and "domain" not in spec["encoding"]["x"]["scale"]   # the data's steps


def test_the_compare_table_says_how_each_job_ended_and_only_the_settings_that_differ():
    from ui.tabs.compare import results_table

    first = {"id": 1, "state": "succeeded", "gpus": 0, "step": 30, "total_steps": 30, "last_loss": 7.1,
             "tokens_per_s": 2000.0, "peak_mem_gb": 3.25, "config": {"base_model": "m", "data_path": "d",
                                                                   "learning_rate": 1e-4, "output_dir": "/j/1"}}
    second = {**first, "id": 2, "gpus": 1, "state": "running", "step": 3, "peak_mem_gb": None,
              "config": {**first["config"], "learning_rate": 3e-4, "lora_rank": 16, "output_dir": "/j/2"}}
    table = results_table([("#1 a", first, [{"step": 0, "val_loss": 7.3}, {"step": 10, "val_loss": 7.0},
                                            {"step": 20, "val_loss": 7.05}]), ("#2 b", second, [])])
    # a sweep's --set values, found: the settings that differ, not output_dir (the server's) nor the others
    assert list(table.columns) == ["job", "state", "progress", "lowest val loss", "last loss", "run tokens/s", "peak GB",
                                   "lora_rank", "learning_rate", "gpus"]
    assert table.iloc[0].tolist() == ["#1 a", "succeeded", "30/30 (100%)", "7.0000 (step 10)", "7.1000", "",
                                      "3.2", "8", "0.0001", "0"]   # lora_rank: #1's config lacks it, the default
    assert table.iloc[1].tolist()[3:] == ["", "7.1000", "", "", "16", "0.0003", "1"]
    # tokens/s over the run (what it trained in its training loops' time), not its last step's
    points = [{"step": 1, "loss": 7.0, "tokens_seen": 1000, "train_s": 2.0},
              {"step": 2, "loss": 6.9, "tokens_seen": 3000, "train_s": 2.5}]
    assert results_table([("#1 a", first, points)]).iloc[0]["run tokens/s"] == "1,200"
    paths = results_table([("#1 a", first, []), ("#2 b", {**second, "config": {**second["config"],
                                                                               "data_path": "/srv/p/datasets/b.jsonl"}},
                                                []),])
    assert paths.iloc[1]["data_path"] == "…/datasets/b.jsonl" and paths.iloc[0]["data_path"] == "d"
    assert list(results_table([("#1 a", first, [])]).columns)[-1] == "peak GB"   # one job: nothing differs


def test_compare_plots_against_tokens_seen_or_training_time_and_skips_points_that_lack_them():
    import pandas as pd

    from ui.tabs.compare import compare_chart, x_value

    point = {"step": 4, "loss": 6.0, "tokens_seen": 8192, "train_s": 90.0}
    assert [x_value(point, against) for against in ("step", "tokens_seen", "train_min")] == [4, 8192, 1.5]
    assert x_value({"step": 4, "loss": 6.0}, "train_min") is None   # a trainer from before they were counted
    frame = pd.DataFrame([(1.5, 6.0, "#1 a")], columns=["train_min", "loss", "job"])
    spec = json.loads(compare_chart(frame, "loss", "train_min").plot)
    assert spec["encoding"]["x"]["field"] == "train_min" and spec["encoding"]["x"]["title"] == "training time (minutes)"
    assert spec["encoding"]["tooltip"][1] | {"title": None} == {"field": "train_min", "type": "quantitative",
                                                               "title": None, "format": ".2f"}
    tokens = json.loads(compare_chart(frame.rename(columns={"train_min": "tokens_seen"}), "loss", "tokens_seen").plot)
    assert tokens["encoding"]["x"]["axis"]["format"] == "~s" and tokens["data"]["values"][0]["tokens_seen"] == 1.5
    assert tokens["encoding"]["tooltip"][1]["format"] == ",d"   # 2,500,000 tokens, not 2.5e+6 (nor step 1.235e+4)


def test_job_summary_names_a_retry_and_a_cancel_is_not_a_failure_and_the_log_tail_is_for_people():
    from ui.tabs.jobs import job_summary, log_html

    job = {"id": 3, "name": "r", "state": "cancelled", "config": {}, "retry_of": 2, "attempt": 1, "max_attempts": 3,
           "failure_class": "cancelled", "failure_reason": "cancelled by request"}
    text = job_summary(job)
    assert "retry of job #2" in text and "**Cancelled by request.**" in text and "Failed" not in text
    tail = log_html(['{"step": 1, "loss": 7.3}', "step 1/10 | loss 7.3000", '[node 1] {"event": "done"}', "done"])
    assert "step 1/10 | loss 7.3000" in tail and "done" in tail and "&quot;step&quot;" not in tail
    assert "event" not in tail


# what torchrun 2.13 printed after a rank exited 2 (tests/ui: the log tail shows it as one line)
TORCHRUN_REPORT = """\
E1129 10:36:14.949000 28243 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 0 \
(pid: 28248) of binary: /venv/bin/python
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 8, in <module>
    sys.exit(main())
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
trainer_core.train FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 28248)
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================""".splitlines()


def test_the_log_tail_ends_with_the_trainers_error_not_torchruns_report_of_it():
    from ui.jobtext import readable_lines

    error = "/data/bad.jsonl:1101: not valid JSON (Expecting value at column 33)"
    ended = "[paratrain] attempt 1 ended: data, exit 2: /data/bad.jsonl:1101: not valid JSON"
    shown = readable_lines(["step 1/10 | loss 7.3", error, *TORCHRUN_REPORT, ended])
    assert shown == ["step 1/10 | loss 7.3", error, f"[torchrun: local rank 0 exited with code 2; its report of "
                     f"{len(TORCHRUN_REPORT)} lines is not shown]", ended]
    # a multi-node job's lines carry their node; a report still arriving is one line already
    shown = readable_lines([f"[node 1] {line}" for line in [error, *TORCHRUN_REPORT[:4]]])
    assert shown == [f"[node 1] {error}", "[node 1] [torchrun: local rank 0 exited with code 2; its report of 4 "
                     "lines is not shown]"]
    assert readable_lines(["=" * 60, "plain"]) == ["=" * 60, "plain"]   # a fence alone is the trainer's own
    # a report cut short (torchrun killed) ends at the worker's next line: the next attempt's lines show
    shown = readable_lines(["step 1/10", *TORCHRUN_REPORT[:3], "[paratrain] attempt 1 ended: crash",
                            "resuming from step 1", "paratrain: training diverged at step 3"])
    assert shown[1:] == ["[torchrun: local rank 0 exited with code 2; its report of 3 lines is not shown]",
                         "[paratrain] attempt 1 ended: crash", "resuming from step 1",
                         "paratrain: training diverged at step 3"]
    # another node's lines, arriving amid node 0's report, are shown
    node0 = [f"[node 0] {line}" for line in TORCHRUN_REPORT]
    shown = readable_lines([*node0[:5], "[node 1] paratrain: out of memory on rank 1", *node0[5:]])
    assert shown == [f"[node 0] [torchrun: local rank 0 exited with code 2; its report of {len(node0)} lines is not "
                     "shown]", "[node 1] paratrain: out of memory on rank 1"]


def test_a_queued_job_no_online_worker_can_take_says_why_in_its_summary():
    """On the CPU-only `paratrain serve`, a job of the API's default gpus: 1 waits for ever: the summary says so
    (before, only the job's log did)."""
    from ui.tabs.jobs import job_summary, wait_reason

    class CpuOnlyCluster:
        def workers(self):
            return [{"online": True, "stopping": False, "gpus": []}]

    job = {"id": 6, "state": "queued", "config": {}, "gpus": 1, "nodes": 1}
    reason = wait_reason(CpuOnlyCluster(), job)
    assert reason == "No online worker has 1 GPU (the most is 0): the job waits until a worker with that many joins."
    assert f"**waits** {reason}" in job_summary(job, reason)
    assert wait_reason(CpuOnlyCluster(), {**job, "gpus": 0}) is None                 # it only waits its turn
    assert wait_reason(CpuOnlyCluster(), {**job, "state": "running"}) is None


def test_a_yaml_the_form_cannot_load_is_named_in_a_toast_that_keeps_the_parsers_words(tmp_path):
    """Toasts render HTML: the YAML parser's "<stream end>" was swallowed as a tag, cutting the message."""
    import warnings

    from ui.app import build_ui

    ui = build_ui("http://127.0.0.1:9")
    (load,) = [b.fn for b in ui.blocks.fns.values() if getattr(b.fn, "__name__", "") == "load"]
    bad = tmp_path / "badsyntax.yaml"
    bad.write_text("base_model: m\ndata_path: [datasets/demo.jsonl\n")
    with warnings.catch_warnings(record=True) as shown:   # gr.Warning outside a request is a Python warning
        warnings.simplefilter("always")
        load(str(bad))
    assert [str(w.message) for w in shown] == [
        "Cannot load badsyntax.yaml: not valid YAML at line 3, column 1: expected ',' or ']', "
        "but got '&lt;stream end&gt;'"]


def test_a_short_curve_gets_whole_step_ticks():
    """Over steps 1..3 the plot ticks every half step, which the whole-step format labels '1 2 2 3 3'."""
    from ui.tabs.jobs import SHORT_CURVE_STEPS, step_axis

    assert step_axis([{"step": 1}, {"step": 3}]) == [1, SHORT_CURVE_STEPS] == step_axis([])
    # a longer curve gets its own range, set explicitly (None would keep the range drawn before)
    assert step_axis([{"step": s} for s in range(1, 31)]) == [1, 30]
    assert step_axis([{"step": s} for s in range(0, 31)]) == [0, 30]


def test_a_gpu_size_or_text_length_that_is_no_number_is_named_not_replaced_by_a_default():
    """An emptied GPU memory once estimated for 80 GB while the form showed nothing; -10 got a toast naming no
    input, and the estimate above stayed."""
    from ui.tabs.memory import gpu_mem_gib, tokens_per_text_value

    assert gpu_mem_gib(24) == 24.0 and gpu_mem_gib("80") == 80.0
    for bad in (None, 0, -10, "lots", float("nan")):
        with pytest.raises(ValueError, match="GPU memory: .* is no GPU size"):
            gpu_mem_gib(bad)
    assert tokens_per_text_value("") is None and tokens_per_text_value(" 300 ") == 300
    for bad in ("abc", "-5", "0", "2.5"):
        with pytest.raises(ValueError, match="typical tokens per text: .* is not a positive whole number"):
            tokens_per_text_value(bad)


def test_edit_as_new_job_takes_what_the_job_asked_for_not_what_the_server_derived():
    """A 2-GPU job is stored with nproc 2 (one process per GPU) and a max_attempts that hand-backs grew: a
    form holding those would be refused as soon as the user changed the GPU count."""
    from ui.form import job_body, job_values, validate

    job = {"id": 4, "state": "failed", "gpus": 2, "nproc": 2, "nodes": 1, "priority": 5, "max_attempts": 140,
           "config": {"base_model": "models/m", "data_path": "d.jsonl", "lora_rank": 4, "output_dir": "/srv/jobs/4/out",
                      "resume": True}}
    values = job_values(job)
    assert (values["gpus"], values.get("nproc"), values["priority"], values["max_attempts"]) == (2, None, 5, 100)
    assert values["output_dir"] != "/srv/jobs/4/out" and values["lora_rank"] == 4
    from ui.tabs.jobs import settings_yaml

    shown = settings_yaml(job)   # what the job asked for, not the form's default output_dir
    assert "lora_rank: 4" in shown and "output_dir" not in shown and "resume" not in shown and "nproc" not in shown
    assert "not loadable" in settings_yaml({**job, "config": {**job["config"], "old_key": 1}})
    values["gpus"] = 4
    config, error = validate(values, with_job=True)
    assert error == "" and job_body(values, config)["gpus"] == 4 and "nproc" not in job_body(values, config)
    cpu = job_values({**job, "gpus": 0, "nproc": 3})
    assert (cpu["gpus"], cpu["nproc"]) == (0, 3)


def test_compare_says_when_the_validation_losses_average_other_samples():
    from ui.tabs.compare import validation_set_differences

    held_out = {"data_path": "/d/demo.jsonl", "val_ratio": 0.1, "seed": 42, "max_seq_len": 1024}
    sweep = {"#1": held_out, "#2": {**held_out, "learning_rate": 1e-3}}
    assert validation_set_differences(sweep) == []   # a learning-rate sweep: comparable
    assert validation_set_differences({**sweep, "#3": {**held_out, "seed": 1}}) == [
        "validation set 10% of /d/demo.jsonl held out (seed 42) for #1, #2; 10% of /d/demo.jsonl held out (seed 1) "
        "for #3"]
    assert validation_set_differences({"#1": held_out, "#4": {**held_out, "max_seq_len": 256}}) == [
        "max_seq_len 1024 for #1; 256 for #4"]
    # (an unset field is its default: max_seq_len 1024 is the same); one held out, one from a file: said so, in
    # words (it read "data_path ... none for #5" and "val_ratio 0.1 for #1; none for #5")
    assert validation_set_differences({"#1": held_out, "#5": {"val_data_path": "/srv/d/val.jsonl"}}) == [
        "validation set 10% of /d/demo.jsonl held out (seed 42) for #1; the file …/d/val.jsonl for #5"]
    from_file = {"val_data_path": "/d/val.jsonl", "data_path": "/d/a.jsonl"}
    assert validation_set_differences({"#6": from_file, "#7": {**from_file, "data_path": "/d/b.jsonl"}}) == []


def test_samples_are_shown_as_tables_with_the_users_text_escaped():
    """A sample is the user's data and the model's words: markup in either is shown, never run."""
    from ui.tabs.jobs import samples_html

    record = {"step": 30, "source": "validation", "sample": 0, "main": "Q: <script>alert(1)</script> & ${x}",
              "branches": [{"start": "A <b>", "generated": "</td></tr><img src=x onerror=alert(2)>", "data": "1 < 2"}]}
    shown = samples_html([record, {**record, "sample": 3, "source": "training"}])
    assert "<script>" not in shown and "<img" not in shown and "A &lt;b&gt;" in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; ${x}" in shown and "1 &lt; 2" in shown
    assert shown.count("<table>") == 2 and "Sample 0 of the validation set" in shown
    assert "Sample 3 of the training set" in shown and "<td>1</td>" in shown
    assert samples_html([]) == ""
