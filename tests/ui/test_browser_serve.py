"""Acceptance: Debian chromium drives the UI of a real `paratrain serve` (server + UI + local worker that
runs torchrun + trainer_core.train on CPU with the tiny model): log in, apply a preset, submit, watch the
loss curve gain points, reload mid-training and get the complete curve back, cancel a second job.
Screenshots go to test-output/ui/test_serve_end_to_end/."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.ui.browser import (CHROMIUM, CHROMIUM_ARGS, LAPTOP, REPO, choose, curve_points, curve_state, field, login,
                              output_dir, require_chromium, set_field, tab, wait_for)
from tests.ui.conftest import free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PARATRAIN = Path(sys.executable).parent / "paratrain"   # the environment running the tests (PARATRAIN_VENV)


@pytest.fixture
def serve(tmp_path, tiny_model_dir, demo_data_path):
    """`paratrain serve` on a free port with the tiny model and demo data inside its data dir."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data_dir / "models" / "tiny")
    (data_dir / "datasets").mkdir(parents=True)
    shutil.copy(demo_data_path, data_dir / "datasets" / "demo.jsonl")
    port = free_port()
    log_path = output_dir("test_serve_end_to_end") / "serve.log"
    log = open(log_path, "wb")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # --no-demo: the session's tiny model and demo data are copied in above (quicker than building them again)
    proc = subprocess.Popen([str(PARATRAIN), "serve", "--data-dir", str(data_dir), "--port", str(port),
                             "--no-demo", "--worker-gpus", "none"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert proc.poll() is None, f"paratrain serve exited; see {log_path}"
            try:
                if httpx.get(f"{base}/api/health", timeout=1).status_code == 200 and (data_dir / "token").exists():
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError(f"paratrain serve did not start; see {log_path}")
        yield base, (data_dir / "token").read_text().strip()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the whole serve group: server, worker, trainer
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def test_serve_end_to_end(serve):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    base, token = serve
    shots = output_dir("test_serve_end_to_end")
    print(f"screenshots: {shots}")
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=LAPTOP)
        expect.set_options(timeout=30_000)  # the default 5 s is short for a 2-core machine that also trains
        page.set_default_timeout(30_000)
        # the local worker (--worker-gpus none) is registered before the page asks what the workers have
        wait_for(lambda: api.get("/api/workers").json()["data"], timeout=60)
        login(page, base, token)
        page.screenshot(path=shots / "01-logged-in.png")
        # no GPU anywhere: a job asks for none by default, so that it runs on the CPU worker
        expect(field(page, "job-gpus")).to_have_value("0")
        expect(page.locator("#gpu-mem")).to_contain_text("No worker reports a GPU")

        # a preset for a 0.5B model, then the tiny model's paths and a CPU-sized run
        set_field(page, "cfg-base_model", "models/tiny")
        set_field(page, "cfg-data_path", "datasets/demo.jsonl")
        choose(page, "preset-model", "0.5B")
        page.locator("#get-presets").click()
        page.locator("#preset-choice").get_by_text("few long branches").click()
        page.locator("#apply-preset").click()
        expect(field(page, "cfg-rope_2d_ratio")).to_have_value("0.35")
        expect(page.locator("#estimate-md")).to_contain_text("Estimated peak")
        expect(page.locator("#estimate-md")).to_contain_text("No GPU worker online")
        for elem_id, value in (("cfg-max_seq_len", 64), ("cfg-batch_size", 2), ("cfg-accumulation_steps", 1),
                               ("cfg-max_steps", 30), ("job-gpus", 0), ("cfg-val_ratio", 0.1)):
            set_field(page, elem_id, value)
        page.locator("#group-output button.label-wrap").click()
        set_field(page, "cfg-eval_interval", 10)
        page.locator("#preview-command").click()
        expect(page.locator("#command-preview")).to_contain_text("--rope_2d_ratio 0.35")
        # the estimate follows the form: 2 samples x 4 branches x 64 tokens
        expect(page.locator("#estimate-md")).to_contain_text("512 tokens per micro-batch")
        page.screenshot(path=shots / "02-new-job.png", full_page=True)

        # submit and watch the curve grow while the job trains
        page.locator("#submit-job").click()
        expect(page.locator("#job-summary")).to_contain_text("Job #1", timeout=30_000)
        first = wait_for(lambda: (n := curve_points(page)) >= 2 and n, timeout=120)
        later = wait_for(lambda: (n := curve_points(page)) > first and n, timeout=60)
        assert later > first
        page.screenshot(path=shots / "03-training.png", full_page=True)

        # reload mid-training: the curve comes back complete (every step the server has, none missing)
        assert api.get("/api/jobs/1").json()["state"] == "running"
        page.reload()
        page.locator("#main-panel").wait_for(state="visible")
        tab(page, "Jobs")
        expect(page.locator("#job-summary")).to_contain_text("Job #1")
        after = wait_for(lambda: (n := curve_points(page)) >= later and n)
        # complete: one point per logged step from step 1 (log_interval 1), as the server has them, and the
        # validation loss before training (step 0)
        points, last_step = curve_state(page)
        assert points == last_step >= after
        metrics = api.get("/api/jobs/1/metrics").json()["data"]
        assert [m["step"] for m in metrics if m["loss"] is not None][: after] == list(range(1, after + 1))
        assert metrics[0]["step"] == 0 and metrics[0]["val_loss"] > 0
        expect(page.locator("#loss-plot")).to_contain_text("validation")
        page.screenshot(path=shots / "04-after-reload.png", full_page=True)

        # a second job waits behind the first (one CPU slot); cancel it from the UI
        tab(page, "New job")
        page.locator("#group-output button.label-wrap").click()   # closed again by the reload
        set_field(page, "cfg-name", "to-cancel")
        page.locator("#submit-job").click()
        expect(page.locator("#job-summary")).to_contain_text("Job #2")
        # a poll that began for job #1 must not bring it back (with Cancel acting on it) a moment later
        page.wait_for_timeout(2500)
        expect(page.locator("#job-summary")).to_contain_text("Job #2")
        page.locator("#cancel-job").click()
        expect(page.locator("#job-summary")).to_contain_text("cancel")
        wait_for(lambda: api.get("/api/jobs/2").json()["state"] == "cancelled", timeout=60)
        expect(page.locator("#jobs-table")).to_contain_text("cancelled")
        page.screenshot(path=shots / "05-cancelled.png", full_page=True)

        # the dataset preview of the form's data, with the real tokenizer
        tab(page, "Dataset")
        page.locator("#check-dataset").click()
        expect(page.locator("#dataset-summary")).to_contain_text("The data is valid")
        summary = api.post("/api/datasets/check", json={"data_path": "datasets/demo.jsonl", "base_model": "models/tiny",
                                                       "max_seq_len": 64, "max_branches_per_sample": 4}).json()
        if summary.get("example_layout"):  # the full summary (trainer_core.data_cli.summarize)
            expect(page.locator("#dataset-summary")).to_contain_text("padding share")
            expect(page.locator("#layout-picture svg rect").first).to_be_visible()
        page.screenshot(path=shots / "06-dataset.png", full_page=True)
        # a failed check leaves none of the earlier check's pictures beside its message, as if they were its
        tab(page, "New job")
        data_path = field(page, "cfg-data_path").input_value()
        set_field(page, "cfg-data_path", "datasets/nope.jsonl")
        tab(page, "Dataset")
        page.locator("#check-dataset").click()
        expect(page.locator("#dataset-summary")).to_contain_text("nope.jsonl")
        expect(page.locator("#layout-picture svg")).to_have_count(0)
        expect(page.locator("#branches-histogram")).to_be_hidden()
        tab(page, "New job")
        set_field(page, "cfg-data_path", data_path)

        # when the first job is done, its adapter downloads as a zip
        wait_for(lambda: api.get("/api/jobs/1").json()["state"] == "succeeded", timeout=120)
        tab(page, "Jobs")
        choose(page, "job-picker", "#1")
        expect(page.locator("#job-summary")).to_contain_text("succeeded")
        expect(page.locator("#job-summary")).to_contain_text(re.compile(r"lowest \d+\.\d+ at step \d+"))
        with page.expect_download(timeout=30_000) as saved:   # one click: the browser saves the zip
            page.locator("#download-adapter").click()
        assert saved.value.suggested_filename == "job1-adapter.zip"
        names = zipfile.ZipFile(saved.value.path()).namelist()
        expect(page.locator("#adapter-file")).to_contain_text("job1-adapter")   # and its link stays there
        link = page.locator("#adapter-file a").first.get_attribute("href")
        assert page.request.get(link if link.startswith("http") else f"{base}{link}").status == 200, link
        # the final adapter, and the one of the lowest validation loss (the job held out a tenth)
        assert {"adapter/adapter_model.safetensors", "adapter_best/validation.json"} <= set(names), names
        # what the trained model wrote, beside what the data has: a table per sample, a row per branch
        samples = [json.loads(line) for line in api.get("/api/jobs/1/artifacts/samples.jsonl").text.splitlines()]
        expect(page.locator("#job-samples table")).to_have_count(len(samples))
        expect(page.locator("#job-samples")).to_contain_text(f"Sample {samples[0]['sample']} of the validation set")
        first = page.locator("#job-samples table").first.locator("tbody tr").first.locator("td")
        expect(first.nth(2)).to_have_text(samples[0]["branches"][0]["generated"].strip())
        page.screenshot(path=shots / "07-succeeded-adapter.png", full_page=True)

        # a new job trains on from that adapter (the lowest validation loss's, unless that was before training:
        # then the last step's), with job #1's settings
        page.locator("#train-on").click()
        best_step = json.loads(api.get("/api/jobs/1/artifacts/adapter_best/validation.json").content)["step"]
        which = "adapter_best" if best_step > 0 else "adapter"
        start_step = best_step if best_step > 0 else 30
        expect(field(page, "cfg-init_adapter")).to_have_value(
            f"{api.get('/api/jobs/1').json()['config']['output_dir']}/{which}")
        expect(field(page, "cfg-rope_2d_ratio")).to_have_value("0.35")
        set_field(page, "cfg-max_steps", 2)
        page.screenshot(path=shots / "08-train-on.png", full_page=True)
        page.locator("#submit-job").click()
        expect(page.locator("#job-summary")).to_contain_text("Job #3")
        wait_for(lambda: api.get("/api/jobs/3").json()["state"] in ("succeeded", "failed"), timeout=120)
        assert api.get("/api/jobs/3").json()["state"] == "succeeded", api.get("/api/jobs/3/logs").json()
        # it starts where job #1's adapter was: the same validation samples, the same loss
        start = api.get("/api/jobs/3/metrics").json()["data"][0]
        assert start["step"] == 0
        [then] = [m["val_loss"] for m in api.get("/api/jobs/1/metrics").json()["data"] if m["step"] == start_step]
        assert abs(start["val_loss"] - then) < 1e-4, (start, then, which)
        browser.close()
    # minutes of an open page polling the API, and not one line of it in the server's log
    assert "HTTP Request" not in (shots / "serve.log").read_text(errors="replace")
