"""Jobs REST API: create/list/get/cancel/retry/delete, validation naming the field, auth, path roots."""

from __future__ import annotations

import json
import shutil
import os
from pathlib import Path

import pytest



def test_requests_without_a_token_get_401(client):
    for method, path in [("get", "/api/jobs"), ("post", "/api/jobs"), ("get", "/api/jobs/1"),
                         ("get", "/api/workers"), ("get", "/api/config-schema"), ("get", "/api/jobs/1/events")]:
        r = client.request(method, path, headers={"Authorization": ""})
        assert r.status_code == 401, (method, path)
        r = client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, (method, path)
    assert client.get("/api/health", headers={"Authorization": ""}).status_code == 200


def test_worker_token_is_not_a_user_token_and_back(client, worker_headers):
    assert client.get("/api/jobs", headers=worker_headers).status_code == 401
    r = client.post("/api/workers/register", json={"name": "w"})
    assert r.status_code == 401


def test_create_get_list(client, job_body):
    r = client.post("/api/jobs", json=job_body(name="first"))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["attempt"] == 1 and job["nproc"] == 1
    assert job["config"]["output_dir"].endswith(f"jobs/{job['id']}/out")
    assert os.path.isabs(job["config"]["data_path"])
    assert client.get(f"/api/jobs/{job['id']}").json()["name"] == "first"
    client.post("/api/jobs", json=job_body(name="second"))
    listed = client.get("/api/jobs").json()
    assert listed["count"] == 2 and [j["name"] for j in listed["data"]] == ["second", "first"]
    assert client.get("/api/jobs", params={"state": "running"}).json()["count"] == 0
    assert client.get("/api/jobs/999").status_code == 404


def test_bad_input_is_422_naming_the_field(client, job_body, settings):
    r = client.post("/api/jobs", json=job_body(lora_rank=0))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "lora_rank"]
    r = client.post("/api/jobs", json=job_body(no_such_flag=1))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "no_such_flag"
    r = client.post("/api/jobs", json=job_body(data_path="datasets/missing.jsonl"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "data_path"]
    # where it looked, so a user who got the root wrong sees it
    assert f"looked for {settings.data_root.resolve() / 'datasets' / 'missing.jsonl'}" in r.json()["detail"][0]["msg"]
    r = client.post("/api/jobs", json=job_body(data_path="datasets"))
    assert r.status_code == 422 and "is a directory" in r.json()["detail"][0]["msg"]
    r = client.post("/api/jobs", json=job_body(base_model="datasets"))
    assert r.status_code == 422 and "no config.json" in r.json()["detail"][0]["msg"]
    r = client.post("/api/jobs", json={**job_body(), "gpus": -1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gpus"]
    r = client.post("/api/jobs", json={**job_body(), "gpus": 2, "nproc": 3})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "nproc"]
    r = client.post("/api/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/api/jobs", content=b'{"config": {"base_model": "\xff"}}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not UTF-8 text (byte 27)" in r.json()["detail"][0]["msg"]   # was a bare 400


def test_a_misspelt_query_parameter_is_a_422_naming_it_not_a_silently_different_answer(client, job_body):
    client.post("/api/jobs", json=job_body())
    r = client.get("/api/jobs", params={"stat": "running"})   # once answered with every job
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "stat"] and "did you mean 'state'?" in r.json()["detail"][0]["msg"]
    r = client.get("/api/jobs/1/metrics", params={"since": 3})
    assert r.status_code == 422 and "did you mean 'since_step'?" in r.json()["detail"][0]["msg"]
    assert client.get("/api/workers", params={"x": 1}).status_code == 422
    assert client.get("/api/workers", params={"x": 1}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/jobs", params={"state": "queued", "limit": 5}).json()["count"] == 1


def test_a_dataset_in_the_wrong_format_is_refused_at_submit_naming_its_lines(client, settings, job_body):
    """Not queued with a check mark to fail when a worker reaches it: the first 1,000 lines are read at once."""
    (settings.data_dir / "datasets" / "chat.jsonl").write_text(
        '{"main": "m", "branches": ["a"]}\n{"messages": [{"role": "user", "content": "hi"}]}\n[1, 2]\n')
    r = client.post("/api/jobs", json=job_body(data_path="datasets/chat.jsonl"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "data_path"], r.text
    message = r.json()["detail"][0]["msg"]
    assert message.startswith("datasets/chat.jsonl:2: ") and "; datasets/chat.jsonl:3: " in message, message
    assert client.get("/api/jobs").json()["count"] == 0
    # a bad line past the first 1,000 is the trainer's to find (it reads every line before loading a model)
    good = '{"text": "t"}\n' * 1000
    (settings.data_dir / "datasets" / "late.jsonl").write_text(good + "not json\n")
    assert client.post("/api/jobs", json=job_body(data_path="datasets/late.jsonl")).status_code == 201
    (settings.data_dir / "datasets" / "blank_start.jsonl").write_text("\n" * 1000 + '{"text": "t"}\n')
    assert client.post("/api/jobs", json=job_body(data_path="datasets/blank_start.jsonl")).status_code == 201


def test_a_validation_file_is_checked_and_confined_as_the_data_file_is(client, settings, tmp_path_factory, job_body):
    """val_data_path is read by the trainer like data_path: resolved under the data root, its first lines
    checked at submit, every mistake a 422 naming val_data_path."""
    (settings.data_dir / "datasets" / "chat.jsonl").write_text('{"messages": []}\n')
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jsonl").write_text('{"text": "x"}\n')
    for val_data_path, message in [("datasets/missing.jsonl", "no such file"), ("datasets", "is a directory"),
                                   ("datasets/chat.jsonl", "datasets/chat.jsonl:1: "),
                                   (str(outside / "secret.jsonl"), "outside"), ("../secret.jsonl", "outside")]:
        r = client.post("/api/jobs", json=job_body(val_data_path=val_data_path))
        assert r.status_code == 422, (val_data_path, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "config", "val_data_path"], r.text
        assert message in r.json()["detail"][0]["msg"], r.text
    r = client.post("/api/jobs", json=job_body(val_data_path="datasets/demo.jsonl", val_ratio=0.1))
    assert r.status_code == 422 and "give one of them" in r.json()["detail"][0]["msg"]
    r = client.post("/api/jobs", json=job_body(val_ratio=0.6))   # more held out than trained on: a slip
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "val_ratio"], r.text
    r = client.post("/api/jobs", json=job_body(early_stop_patience=3))   # stops on a validation loss it lacks
    assert r.status_code == 422 and "give val_ratio or val_data_path too" in r.json()["detail"][0]["msg"], r.text
    r = client.post("/api/jobs", json=job_body(val_ratio=0.1, early_stop_min_delta=0.01))   # no early stop to tune
    assert r.status_code == 422 and "give early_stop_patience too" in r.json()["detail"][0]["msg"], r.text
    assert client.get("/api/jobs").json()["count"] == 0
    (settings.data_dir / "datasets" / "val.jsonl").write_text('{"text": "held out"}\n')
    job = client.post("/api/jobs", json=job_body(val_data_path="datasets/val.jsonl")).json()
    assert job["config"]["val_data_path"] == str((settings.data_root / "datasets" / "val.jsonl").resolve())
    assert client.post("/api/jobs", json=job_body(val_ratio=0.1)).json()["config"]["val_data_path"] is None


def test_the_dataset_check_reads_the_validation_file_too(client, settings):
    (settings.data_dir / "datasets" / "val.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (settings.data_dir / "datasets" / "bad_val.jsonl").write_text('{"text": "a"}\n{"messages": []}\n')
    body = {"data_path": "datasets/demo.jsonl"}
    good = client.post("/api/datasets/check", json={**body, "val_data_path": "datasets/val.jsonl"}).json()
    assert good["validation_records"] == 2 and good["errors"] == []
    bad = client.post("/api/datasets/check", json={**body, "val_data_path": "datasets/bad_val.jsonl"}).json()
    assert bad["validation_records"] is None and bad["errors"][0].startswith(
        f"{settings.data_root.resolve() / 'datasets' / 'bad_val.jsonl'}:2: "), bad
    missing = client.post("/api/datasets/check", json={**body, "val_data_path": "datasets/nope.jsonl"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "val_data_path"]
    assert client.post("/api/datasets/check", json=body).json()["validation_records"] is None


def test_a_hub_id_as_a_jobs_model_is_told_apart_from_a_typo(client, settings, job_body):
    """The flag's help (shared with the CLI) mentions hub ids; a job reads model directories only."""
    r = client.post("/api/jobs", json=job_body(base_model="Qwen/Qwen2.5-0.5B-Instruct"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "base_model"]
    assert f"no such model directory under the data root ({settings.data_root})" in r.json()["detail"][0]["msg"]
    assert "a hub id works only from the command line" in r.json()["detail"][0]["msg"]


def test_paths_outside_the_data_root_are_refused(client, settings, tmp_path_factory, job_body):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jsonl").write_text('{"text": "x"}\n')
    (settings.data_dir / "datasets" / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (settings.data_dir / "models" / "link").symlink_to(outside)
    for data_path in ["../secret.jsonl", "datasets/../../secret.jsonl", str(outside / "secret.jsonl"),
                      "datasets/link.jsonl", "/etc/passwd"]:
        r = client.post("/api/jobs", json=job_body(data_path=data_path))
        assert 400 <= r.status_code < 500, data_path
        assert r.json()["detail"][0]["loc"] == ["body", "config", "data_path"]
    r = client.post("/api/jobs", json=job_body(base_model="models/link"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "base_model"]


def test_cancel_retry_delete(client, settings, job_body):
    job = client.post("/api/jobs", json=job_body()).json()
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 409  # not finished
    assert client.post(f"/api/jobs/{job['id']}/retry").status_code == 409
    cancelled = client.post(f"/api/jobs/{job['id']}/cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["failure_class"] == "cancelled"
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 409
    r = client.post(f"/api/jobs/{job['id']}/retry")
    assert r.status_code == 201
    retry = r.json()
    assert retry["retry_of"] == job["id"] and retry["state"] == "queued"
    again = client.post(f"/api/jobs/{job['id']}/retry")     # would train the same steps a second time
    assert again.status_code == 409 and f"already retried as job {retry['id']}" in again.json()["detail"]
    # what a client shows before offering a retry: the job says it was retried, and by which job
    assert client.get(f"/api/jobs/{job['id']}").json()["retried_as"] == retry["id"]
    listed = {j["id"]: j["retried_as"] for j in client.get("/api/jobs").json()["data"]}
    assert listed == {job["id"]: retry["id"], retry["id"]: None}
    assert retry["config"]["output_dir"] != job["config"]["output_dir"]
    assert {k: v for k, v in retry["config"].items() if k != "output_dir"} == \
           {k: v for k, v in job["config"].items() if k != "output_dir"}
    out = settings.jobs_dir / str(job["id"])
    out.mkdir(parents=True)
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 204
    assert client.get(f"/api/jobs/{job['id']}").status_code == 404 and not out.exists()
    assert client.get(f"/api/jobs/{retry['id']}").json()["retry_of"] == job["id"]   # history, as documented
    # ids are never reused, so a new job never finds an old job's checkpoints
    newest = client.post("/api/jobs", json=job_body()).json()
    assert newest["id"] > retry["id"]


def test_priorities_and_fifo(client, worker_headers, job_body):
    low = client.post("/api/jobs", json={**job_body(name="low"), "priority": -1}).json()
    first = client.post("/api/jobs", json=job_body(name="first")).json()
    second = client.post("/api/jobs", json=job_body(name="second")).json()
    high = client.post("/api/jobs", json={**job_body(name="high"), "priority": 5}).json()
    wid = client.post("/api/workers/register", json={"name": "w"}, headers=worker_headers).json()["worker_id"]
    order = []
    for _ in range(4):
        r = client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers)
        order.append(r.json()["job"]["id"])
    assert order == [high["id"], first["id"], second["id"], low["id"]]
    assert client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).status_code == 204


def test_gpu_jobs_only_go_where_they_fit(client, worker_headers, job_body):
    two = client.post("/api/jobs", json={**job_body(), "gpus": 2}).json()
    wid = client.post("/api/workers/register", json={"name": "w", "gpus": [{"index": 0}, {"index": 3}]},
                      headers=worker_headers).json()["worker_id"]
    r = client.post(f"/api/workers/{wid}/claim", json={"free_gpu_indices": [3]}, headers=worker_headers)
    assert r.status_code == 204
    r = client.post(f"/api/workers/{wid}/claim", json={"free_gpu_indices": [3, 0]}, headers=worker_headers)
    claim = r.json()
    assert claim["job"]["id"] == two["id"] and claim["gpu_ids"] == [0, 3]
    assert "--nproc_per_node=2" in claim["argv"] and "--ddp" in claim["argv"]
    cpu = client.post("/api/jobs", json=job_body()).json()
    r = client.post(f"/api/workers/{wid}/claim", json={"accept_cpu_jobs": False}, headers=worker_headers)
    assert r.status_code == 204
    r = client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers)
    assert r.json()["job"]["id"] == cpu["id"]


def test_cpu_job_with_two_processes(client, job_body):
    r = client.post("/api/jobs", json={**job_body(), "gpus": 0, "nproc": 2})
    job = r.json()
    argv = client.get(f"/api/jobs/{job['id']}/command").json()["argv"]
    assert argv[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"] and "--ddp" in argv
    preview = client.post("/api/command-preview", json={**job_body(), "gpus": 0, "nproc": 2}).json()["argv"]
    assert preview[:5] == argv[:5]


def test_command_preview_is_the_command_the_worker_will_run(client, job_body):
    preview = client.post("/api/command-preview", json=job_body()).json()["argv"]
    job = client.post("/api/jobs", json=job_body()).json()
    argv = client.get(f"/api/jobs/{job['id']}/command").json()["argv"]
    out = argv.index("--output_dir") + 1
    assert preview[:out] + preview[out + 1:] == argv[:out] + argv[out + 1:]   # paths resolved alike
    assert preview[out] == argv[out].replace(f"/jobs/{job['id']}/", "/jobs/ID/")
    r = client.post("/api/command-preview", json=job_body(data_path="datasets/missing.jsonl"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "data_path"]


def test_config_schema_is_the_train_config(client):
    from trainer_core.config import TrainConfig

    assert client.get("/api/config-schema").json() == TrainConfig.model_json_schema()


def test_every_number_of_a_job_config_has_an_upper_bound(client, job_body):
    """docs/API.md promises bounds on every number: an absurd one (lora_alpha 1e300 trained NaN) is a 422."""
    schema = client.get("/api/config-schema").json()
    for name, prop in schema["properties"].items():
        variants = [prop, *prop.get("anyOf", [])]
        if any(v.get("type") in ("number", "integer") for v in variants):
            assert any("maximum" in v or "exclusiveMaximum" in v for v in variants), name
    for field in ("lora_alpha", "weight_decay", "max_grad_norm"):
        r = client.post("/api/jobs", json=job_body(**{field: 1e300}))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", field], r.text


def test_artifacts_are_confined_to_the_output_dir(client, settings, job_body):
    job = client.post("/api/jobs", json=job_body()).json()
    out = settings.jobs_dir / str(job["id"]) / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / ".owner.json").write_text("{}")                        # the trainer's claim on the dir
    (out / "checkpoints" / ".tmp_step_00000004").mkdir(parents=True)   # a checkpoint being written
    (out / "checkpoints" / ".tmp_step_00000004" / "optimizer.pt").write_text("half")
    (settings.data_dir / "token_copy").write_text("secret")
    listed = client.get(f"/api/jobs/{job['id']}/artifacts").json()["data"]
    assert listed == [{"path": "adapter/adapter_config.json", "size": 2}]
    assert client.get(f"/api/jobs/{job['id']}/artifacts/adapter/adapter_config.json").content == b"{}"
    assert client.get(f"/api/jobs/{job['id']}/artifacts/nope").status_code == 404
    r = client.get(f"/api/jobs/{job['id']}/artifacts/adapter")
    assert r.status_code == 404 and "'adapter' is a directory" in r.json()["detail"]
    r = client.get(f"/api/jobs/{job['id']}/artifacts/..%2F..%2F..%2Ftoken_copy")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "path"], r.text
    # what no trainer writes is no 500 either: a name that is not UTF-8 (unlisted), a symlink loop (missing)
    (out / os.fsdecode(b"latin1-\xe9.txt")).write_text("x")
    (out / "loop1").symlink_to(out / "loop2")
    (out / "loop2").symlink_to(out / "loop1")
    assert client.get(f"/api/jobs/{job['id']}/artifacts").json()["data"] == listed
    assert client.get(f"/api/jobs/{job['id']}/artifacts/loop1").status_code == 404


def test_estimate_and_presets_answer_or_501(client, job_body):
    r = client.post("/api/estimate", json={"config": job_body(base_model="0.5B")["config"], "gpu_mem_gb": 24})
    assert r.status_code in (200, 501)
    r = client.post("/api/estimate", json={"config": job_body()["config"], "gpu_mem_gb": 24})
    assert r.status_code in (422, 501)  # models/tiny has a config.json with no shape in it
    assert r.status_code == 501 or "not a decoder model's config" in r.json()["detail"][0]["msg"]
    r = client.get("/api/presets", params={"gpu_mem_gb": 24, "model": "0.5B"})
    assert r.status_code in (200, 501)
    assert client.post("/api/estimate", json={"config": {}, "gpu_mem_gb": 24}).status_code == 422


def test_dataset_check(client):
    r = client.post("/api/datasets/check", json={"data_path": "datasets/demo.jsonl"})
    assert r.status_code == 200 and r.json()["records"] == 1
    r = client.post("/api/datasets/check", json={"data_path": "../../etc/passwd"})
    assert r.status_code == 422


def test_dataset_check_with_a_tokenizer_returns_the_full_summary(client, settings, tiny_model_dir, demo_data_path):
    import shutil

    shutil.copytree(tiny_model_dir, settings.data_dir / "models" / "tiny-real")
    shutil.copy(demo_data_path, settings.data_dir / "datasets" / "real.jsonl")
    form = {"data_path": "datasets/real.jsonl", "base_model": "models/tiny-real", "max_branches_per_sample": 16,
            "batch_size": 4, "batch_by_samples": True, "lora_rank": 8, "output_dir": "ignored"}
    r = client.post("/api/datasets/check", json=form)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["errors"] == [] and s["samples"] > 0 and s["branches_histogram"]
    assert 0 <= s["padding_share"] < 1 and s["example_layout"]["tokens"]
    # a bad data file and a bad validation file, with a tokenizer: both files' bad lines, not a server error
    (settings.data_dir / "datasets" / "bad.jsonl").write_text('{"text": "a"}\n{"branches": 3}\n')
    (settings.data_dir / "datasets" / "bad_val.jsonl").write_text('{"main": 3}\n')
    both = client.post("/api/datasets/check", json={**form, "data_path": "datasets/bad.jsonl",
                                                    "val_data_path": "datasets/bad_val.jsonl"})
    assert both.status_code == 200 and [e.split(":")[1] for e in both.json()["errors"]] == ["2", "1"], both.text
    bad = client.post("/api/datasets/check", json={**form, "max_seq_len": 0})
    assert bad.status_code == 422 and "max_seq_len" in bad.text
    no_tok = client.post("/api/datasets/check", json={**form, "base_model": "models/tiny"})
    assert no_tok.status_code == 200 and no_tok.json()["records"] > 0 and "no tokenizer" in no_tok.json()["note"]
    outside = client.post("/api/datasets/check", json={**form, "base_model": "../../etc"})
    assert outside.status_code == 422 and "base_model" in outside.text
    # a misspelt, a mistyped field and a missing model are named, not ignored
    typo_key = client.post("/api/datasets/check", json={**form, "max_seq_length": 5})
    assert typo_key.status_code == 422 and typo_key.json()["detail"][0]["loc"] == ["body", "max_seq_length"]
    assert "did you mean 'max_seq_len'?" in typo_key.json()["detail"][0]["msg"]
    for field, value in (("name", {"a": 1}), ("output_dir", 5)):
        mistyped = client.post("/api/datasets/check", json={**form, field: value})
        assert mistyped.status_code == 422 and mistyped.json()["detail"][0]["loc"] == ["body", field], mistyped.text
    missing = client.post("/api/datasets/check", json={**form, "base_model": "models/nope"})
    assert missing.status_code == 422 and "no such model directory" in missing.json()["detail"][0]["msg"]
    # a path that is no file is a 422, as for a job (it was a 200 with an error that scripts missed)
    for data_path, message in (("datasets/nope.jsonl", "no such file"), ("datasets", "is a directory")):
        r = client.post("/api/datasets/check", json={**form, "data_path": data_path})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "data_path"], r.text
        assert message in r.json()["detail"][0]["msg"]
    (settings.data_dir / "datasets" / "broken.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
    broken = client.post("/api/datasets/check", json={**form, "data_path": "datasets/broken.jsonl"})
    assert broken.status_code == 200
    assert broken.json()["errors"][0].endswith("broken.jsonl:2: 'text' must be a string, got a number")
    (settings.data_dir / "datasets" / "typo.jsonl").write_text('{"text": "a"}\n{"text": "b", "lable": 1}\n')
    for with_tokenizer in (form, {"data_path": "datasets/typo.jsonl"}):
        typo = client.post("/api/datasets/check", json={**with_tokenizer, "data_path": "datasets/typo.jsonl"})
        assert typo.status_code == 200 and typo.json()["errors"] == []
        assert typo.json()["warnings"] == [f"{settings.data_dir / 'datasets' / 'typo.jsonl'}: 1 record has keys "
                                           "paratrain ignores: lable (first on line 2)"]


def test_estimate_takes_measured_peaks(client, job_body):
    config = job_body(base_model="0.5B")["config"]
    body = {"config": config, "gpu_mem_gb": 80, "tokens_per_text": 100,
            "measured": [{"config": config, "peak_mem_gb": 20.0}]}
    r = client.post("/api/estimate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["correction"] is not None and r.json()["tokens_per_text"] == 100


def test_ui_is_mounted_with_a_redirect_when_it_imports(settings):
    from fastapi.testclient import TestClient

    from server.main import create_app

    pytest.importorskip("ui.app")
    settings.mount_ui = True
    with TestClient(create_app(settings)) as c:
        r = c.get("/", follow_redirects=False)
        assert r.status_code in (302, 307) and r.headers["location"] == "/ui"
        assert c.get("/ui/").status_code == 200


def test_out_of_range_numbers_are_422_not_500(client, worker_headers):
    huge = 2**70
    for path in [f"/api/jobs/{huge}", f"/api/jobs/{huge}/metrics", f"/api/jobs/{huge}/logs",
                 f"/api/jobs/{huge}/artifacts", f"/api/jobs/{huge}/events", f"/api/jobs?offset={huge}",
                 f"/api/jobs/1/metrics?since_step={huge}"]:
        assert client.get(path).status_code == 422, path
    assert client.get("/api/jobs/1/events", headers={"Last-Event-ID": str(huge)}).status_code in (404, 422)
    r = client.post(f"/api/workers/{huge}/heartbeat", json={"running_job_ids": [huge]}, headers=worker_headers)
    assert r.status_code == 422
    r = client.get("/api/presets", params={"model": "0" * 400})
    assert r.status_code in (422, 501)


def test_nan_infinity_and_unknown_keys_are_422_naming_the_field(client, job_body):
    """NaN/Infinity are valid JSON for Python's parser but no parameter means anything there; a misspelled
    top-level key would silently drop an option."""
    for field, text in [("learning_rate", "NaN"), ("weight_decay", "Infinity"), ("lora_alpha", "-Infinity")]:
        body = json.dumps(job_body()).replace('"max_steps": 3', f'"max_steps": 3, "{field}": {text}')
        r = client.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "config", field] and "finite" in detail["msg"], detail
    body = '{"config": {"base_model": "0.5B", "data_path": "x"}, "gpu_mem_gb": NaN}'
    r = client.post("/api/estimate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code in (422, 501) and (r.status_code == 501 or r.json()["detail"][0]["loc"][-1] == "gpu_mem_gb")
    for key in ("gpu", "priorty"):
        r = client.post("/api/jobs", json={**job_body(), key: 2})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", key], r.text
    for gpus in (True, "2", 1.5):   # not silently 1 or 2
        r = client.post("/api/jobs", json={**job_body(), "gpus": gpus})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gpus"], r.text
    assert client.get("/api/jobs").json()["count"] == 0   # nothing half-stored


def test_a_lone_surrogate_or_an_overlong_path_is_a_422_naming_the_field(client, job_body, worker_headers):
    """JSON can spell a lone UTF-16 surrogate ("\\udcff"), which UTF-8 cannot encode: the 422 that refused it
    failed to encode its own echo of it (a 500). A path too long for the file system is the field's too."""
    surrogate = '"\\udcff"'
    for url, body, loc in [
            ("/api/jobs", json.dumps(job_body(name="x")).replace('"x"', surrogate), ["body", "config", "name"]),
            ("/api/datasets/check", '{"data_path": "demo.jsonl", ' + surrogate + ': 1}', ["body"]),   # a key
            ("/api/workers/register", '{"name": ' + surrogate + '}', ["body", "name"])]:
        headers = {"Content-Type": "application/json", **(worker_headers if "workers" in url else {})}
        r = client.post(url, content=body, headers=headers)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, (url, r.text)
    r = client.post("/api/workers/register", json={"name": "w\n2026-11-29 ERROR forged"}, headers=worker_headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"], r.text   # no forged log line
    r = client.post("/api/workers/register", content='{"name": "w", "gpus": [{"index": 0, "memory_gb": Infinity}]}',
                    headers={"Content-Type": "application/json", **worker_headers})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "memory_gb", r.text
    for path in ("a" * 300, "a/" * 3000):
        r = client.post("/api/jobs", json=job_body(init_adapter=path))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "init_adapter"], r.text
    assert client.get("/api/jobs").json()["count"] == 0


def test_a_body_not_sent_as_json_or_nested_too_deeply_says_so(client, job_body):
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "text/json"}, {}):
        r = client.post("/api/jobs", content=json.dumps(job_body()), headers=headers)
        assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"][0]["msg"], r.text
    r = client.post("/api/jobs", content="[" * 100_000 + "]" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"] == "JSON nested too deeply to read", r.text
    assert client.get("/api/jobs").json()["count"] == 0   # nothing half-stored


def test_values_that_would_fail_the_run_are_refused_at_submit(client, job_body):
    for field, value in [("seed", -5), ("seed", 2**64), ("epochs", 10**20), ("learning_rate", 5.0),
                         ("max_seq_len", 2**40), ("batch_size", 10**9)]:
        r = client.post("/api/jobs", json=job_body(**{field: value}))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", field], (field, r.text)


def test_a_stored_config_that_is_no_longer_valid_is_a_409_on_command_and_retry(client, settings, job_body):
    from sqlmodel import Session

    from server.models import Job

    job = client.post("/api/jobs", json=job_body()).json()
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    with Session(client.app.state.write_engine) as session:   # as an older, looser server stored it
        row = session.get(Job, job["id"])
        row.config = {**row.config, "seed": -1}
        session.add(row)
        session.commit()
    for r in (client.get(f"/api/jobs/{job['id']}/command"), client.post(f"/api/jobs/{job['id']}/retry")):
        assert r.status_code == 409 and "seed" in r.json()["detail"], r.text


def test_unexpected_errors_are_500_without_a_traceback(settings, monkeypatch):
    from fastapi.testclient import TestClient

    from server import crud
    from server.main import create_app

    def broken(**_):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(crud, "list_jobs", broken)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.get("/api/jobs", headers={"Authorization": f"Bearer {c.app.state.tokens.user}"})
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    assert "secret" not in r.text


def test_the_largest_accepted_numbers_and_nul_bytes_reach_the_database_safely(client, worker_headers, job_body):
    """Runs on SQLite and PostgreSQL (conftest): 64-bit ids and offsets the API accepts are compared as such,
    and text with a NUL byte is refused (names) or kept with U+FFFD (what a process printed)."""
    big = 2**63 - 1
    job = client.post("/api/jobs", json=job_body()).json()
    for path in [f"/api/jobs/{big}", f"/api/jobs/{big}/metrics", f"/api/jobs/{job['id']}/logs?offset={big}",
                 f"/api/jobs/{job['id']}/metrics?since_step={big}"]:
        assert client.get(path).status_code in (200, 404), path
    assert client.post("/api/jobs", json={**job_body(name="a\x00b")}).status_code == 422
    assert client.post("/api/workers/register", json={"name": "w\x00"}, headers=worker_headers).status_code == 422
    wid = client.post("/api/workers/register", json={"name": "w"}, headers=worker_headers).json()["worker_id"]
    claim = client.post(f"/api/workers/{wid}/claim", json={}, headers=worker_headers).json()
    r = client.post(f"/api/jobs/{job['id']}/report", headers=worker_headers, json={
        "worker_id": wid, "attempt": claim["job"]["attempt"], "logs": ["bin\x00ary"],
        "metrics": [{"step": big, "loss": 1.0}]})
    assert r.status_code == 200, r.text
    assert "bin\ufffdary" in [x["line"] for x in client.get(f"/api/jobs/{job['id']}/logs").json()["data"]]
    assert client.get(f"/api/jobs/{job['id']}/metrics").json()["data"][0]["step"] == big
    r = client.post(f"/api/jobs/{job['id']}/finish", headers=worker_headers, json={
        "worker_id": wid, "attempt": claim["job"]["attempt"], "exit_code": 2**31, "failure_class": "crash",
        "failure_reason": "died\x00"})
    assert r.json()["exit_code"] == 2**31 and r.json()["failure_reason"] == "died\ufffd"
    r = client.get(f"/api/jobs/{job['id']}/events", params={"last_event_id": big})  # a finished job's stream ends
    assert r.status_code == 200 and "id:" not in r.text and "event: end" in r.text  # nothing after the largest id


def test_a_data_dir_the_server_creates_is_the_owners_alone(tmp_path):
    import stat

    from server.main import create_app
    from server.settings import Settings

    create_app(Settings(data_dir=tmp_path / "new" / "data"))
    assert stat.S_IMODE((tmp_path / "new" / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / "data" / "token").stat().st_mode) == 0o600


def test_a_retry_carries_only_whole_checkpoints_and_resumes_from_the_last_whole_one(tmp_path, monkeypatch):
    """A gang node of the original may still be saving (and pruning) as it exits while the user retries."""
    import os

    from server.crud import _carry_progress
    from trainer_core.checkpoint import FILES, STATE_FILE, latest_checkpoint

    old, new = tmp_path / "old", tmp_path / "new"
    for step in (1, 2, 3):
        whole = old / "checkpoints" / f"step_{step:08d}"
        whole.mkdir(parents=True)
        for name in FILES:
            (whole / name).write_text(name)
    pruned = old / "checkpoints" / "step_00000003"
    link = os.link

    def pruned_meanwhile(src, dst, **kw):   # the original's pruning removes each file just before its copy
        if pruned.name in str(src):
            os.remove(src)
        return link(src, dst, **kw)

    best = old / "adapter_best"   # the lowest validation loss so far: the retry goes on comparing with it
    best.mkdir()
    (best / "validation.json").write_text('{"step": 2, "val_loss": 6.0}')
    monkeypatch.setattr(os, "link", pruned_meanwhile)
    _carry_progress(old, new)
    assert sorted(p.name for p in (new / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert (new / "adapter_best" / "validation.json").read_text() == '{"step": 2, "val_loss": 6.0}'
    half = new / "checkpoints" / "step_00000004"   # listed after the pruning had taken its weights
    half.mkdir()
    (half / STATE_FILE).write_text("{}")
    assert latest_checkpoint(new) == new / "checkpoints" / "step_00000002"


def test_a_full_disk_is_a_503_that_says_so_and_health_notices(client, settings, job_body, monkeypatch, caplog):
    """SQLite refusing writes (disk full, a read-only mount) is the operator's to fix: a 503 naming it, one log
    line a minute instead of two tracebacks a request, and a health check that fails meanwhile."""
    import logging
    import sqlite3
    from collections import namedtuple

    from sqlalchemy.exc import OperationalError

    import server.crud
    import server.main

    def full(**kwargs):
        raise OperationalError("INSERT INTO job ...", {}, sqlite3.OperationalError("database or disk is full"))

    before = client.get("/api/jobs").json()["count"]
    monkeypatch.setattr(server.crud, "create_job", full)
    caplog.set_level(logging.INFO, logger="paratrain.server")
    for _ in range(3):
        r = client.post("/api/jobs", json=job_body())
        assert r.status_code == 503, r.text
        assert r.json()["detail"].startswith("the server cannot write its database (database or disk is full): "
                                             f"free space or fix the permissions of {settings.data_dir}")
    errors = [rec for rec in caplog.records if rec.name == "paratrain.server" and rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [rec.getMessage() for rec in errors]
    assert client.get("/api/jobs").json()["count"] == before      # reads still answer
    assert client.get("/api/health").json() == {"status": "ok"}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(server.main.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    caplog.clear()
    for _ in range(3):   # a load balancer polls: the log says it once a minute
        health = client.get("/api/health")
        assert health.status_code == 503 and health.json()["status"] == "disk full", health.text
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and "disk is full: 4 KiB free" in errors[0], errors


def test_every_server_and_worker_setting_is_in_the_deploy_guide():
    """An environment variable nobody can find is a setting nobody can use (docs/DEPLOY.md)."""
    from server.settings import Settings
    from worker.settings import WorkerSettings

    guide = (Path(__file__).parents[2] / "docs" / "DEPLOY.md").read_text()
    names = [f"PARATRAIN_{field.upper()}" for field in Settings.model_fields] + \
            [f"PARATRAIN_WORKER_{field.upper()}" for field in WorkerSettings.model_fields]
    assert [name for name in names if f"`{name}`" not in guide] == []


def test_the_url_a_local_process_reaches_the_server_at_brackets_an_ipv6_address(tmp_path):
    """serve writes it to <data dir>/server_url, gives it to its local worker and prints it: unbracketed,
    http://::1:8000 is no URL (httpx: invalid port)."""
    from server.settings import Settings

    urls = {host: Settings(data_dir=tmp_path, host=host, port=8000).local_url
            for host in ("127.0.0.1", "0.0.0.0", "::", "::1", "fd00::5")}
    assert urls == {"127.0.0.1": "http://127.0.0.1:8000", "0.0.0.0": "http://127.0.0.1:8000",
                    "::": "http://127.0.0.1:8000", "::1": "http://[::1]:8000", "fd00::5": "http://[fd00::5]:8000"}


def test_a_job_starts_from_an_earlier_jobs_adapter_checked_against_its_settings_at_submit(client, job_body, settings):
    """config.init_adapter: an adapter under the data root or in the jobs' outputs; one of other settings is a
    422 at once, not a failure when a worker starts the job."""
    # job 700's: no job of this test gets that id (PostgreSQL spends an id on each refused request too)
    adapter = settings.jobs_dir / "700" / "out" / "adapter_best"
    adapter.mkdir(parents=True)
    (adapter / "rope2d.json").write_text(json.dumps({"rope_2d_ratio": 0.5, "branch_stride": 128, "base_model": "m"}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    r = client.post("/api/jobs", json=job_body(init_adapter=str(adapter)))
    assert r.status_code == 201, r.text
    assert r.json()["config"]["init_adapter"] == str(adapter)
    for value, message in [("jobs/700/out/adapter_best", None),   # relative: from the data root
                           ("jobs/700/out/adapter", "jobs/700/out/adapter: no such directory"),
                           ("/etc", "outside"),
                           ("datasets", "datasets: not a paratrain adapter directory (no rope2d.json"),
                           ("datasets/demo.jsonl", "demo.jsonl: a file; an adapter is a directory")]:
        r = client.post("/api/jobs", json=job_body(init_adapter=value))
        if message is None:
            assert r.status_code == 201, r.text
            continue
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "config", "init_adapter"], r.text
        assert message in r.json()["detail"][0]["msg"], r.text
    # a retry that resumes a checkpoint does not read the adapter: it is retried after that job was deleted
    started = client.post("/api/jobs", json=job_body(init_adapter="jobs/700/out/adapter_best")).json()
    never_started = client.post("/api/jobs", json=job_body(init_adapter=str(adapter))).json()
    for job in (started, never_started):
        client.post(f"/api/jobs/{job['id']}/cancel")
    checkpoint = Path(started["config"]["output_dir"]) / "checkpoints" / "step_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    shutil.rmtree(settings.jobs_dir / "700")
    r = client.post(f"/api/jobs/{started['id']}/retry")
    assert r.status_code == 201, r.text
    r = client.post(f"/api/jobs/{never_started['id']}/retry")   # no checkpoint: the retry would read it, gone
    assert r.status_code == 422 and "adapter_best: no such directory" in r.json()["detail"][0]["msg"], r.text
    (adapter / "rope2d.json").parent.mkdir(parents=True)
    (adapter / "rope2d.json").write_text(json.dumps({"rope_2d_ratio": 0.5, "branch_stride": 128, "base_model": "m"}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    r = client.post("/api/jobs", json=job_body(init_adapter="jobs/700/out/adapter_best", lora_target_modules="q_proj"))
    assert r.status_code == 201, r.text   # its adapter_config.json names no target modules: checked as they load
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16.0,
                                                             "target_modules": ["v_proj", "q_proj"]}))
    r = client.post("/api/jobs", json=job_body(init_adapter="jobs/700/out/adapter_best", lora_target_modules="q_proj"))
    assert r.status_code == 422 and ("an adapter trained with lora_target_modules q_proj,v_proj (this run: q_proj)"
                                     in r.json()["detail"][0]["msg"]), r.text
    r = client.post("/api/jobs", json=job_body(init_adapter="jobs/700/out/adapter_best", lora_rank=16))
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == ("jobs/700/out/adapter_best: an adapter trained with lora_rank 8 (this run: "
                                            "16), lora_alpha 16 (this run: 32); give its values")


def test_a_job_whose_adapter_a_queued_job_starts_from_is_not_deleted_under_it(client, job_body):
    source = client.post("/api/jobs", json=job_body(name="source")).json()
    client.post(f"/api/jobs/{source['id']}/cancel")
    adapter = Path(source["config"]["output_dir"]) / "adapter_best"
    adapter.mkdir(parents=True)
    (adapter / "rope2d.json").write_text(json.dumps({"rope_2d_ratio": 0.5, "branch_stride": 128, "base_model": "m"}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    follower = client.post("/api/jobs", json=job_body(init_adapter=str(adapter))).json()
    r = client.delete(f"/api/jobs/{source['id']}")
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (f"job {follower['id']} (queued) starts from job {source['id']}'s adapter "
                                  f"(init_adapter): delete job {source['id']} once it has ended, or cancel it first")
    assert adapter.is_dir()   # nothing deleted
    client.post(f"/api/jobs/{follower['id']}/cancel")
    assert client.delete(f"/api/jobs/{source['id']}").status_code == 204 and not adapter.exists()
