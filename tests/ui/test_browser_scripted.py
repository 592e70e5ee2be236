"""The UI in Debian chromium against the real server app, with a scripted worker (REST only, no torchrun):
quick and deterministic checks of login, presets, estimate, preview, submit, live curves, reload, cancel,
dataset check, compare — and screenshots at a laptop size under test-output/ui/."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.ui.browser import (CHROMIUM, CHROMIUM_ARGS, LAPTOP, choose, curve_points, field, login, output_dir,
                              require_chromium, set_field, tab, wait_for)

pytestmark = pytest.mark.browser
CRASH = ("exit code 1\nTraceback (most recent call last):\n  File \"<frozen runpy>\", line 198, in _run_module_as_main\n"
         "  File \"/srv/trainer_core/train.py\", line 40, in main\n    batch = next(batches)\n"
         "ValueError: line 7 has no text")


@contextlib.contextmanager
def _stopping(event: threading.Event):
    try:
        yield
    finally:
        event.set()


def load_yaml_input(page):
    """Load YAML's file input: Gradio puts it beside the button, not inside #load-yaml, and a Dataframe has a
    hidden CSV upload of its own."""
    return page.locator("input[type=file][accept*='.yaml']")


def test_ui_flow_with_scripted_worker(live_server, scripted_worker, request, capfd):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    shots = output_dir(request.node.name)
    print(f"screenshots: {shots}")
    stop, pause = threading.Event(), threading.Event()
    reported: list[int] = []

    with sync_playwright() as p, _stopping(stop):
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=LAPTOP)
        console_errors: list[str] = []   # a missing resource (the favicon was one) or a script error
        page.on("console", lambda m: m.type == "error" and console_errors.append(f"{m.text} {m.location}"))
        expect.set_options(timeout=30_000)  # the default 5 s is short for a 2-core machine that also trains
        page.set_default_timeout(20_000)

        # login: a wrong token is refused with a clear message
        page.goto(f"{live_server.base_url}/ui/")
        field(page, "login-token").fill("wrong-token")
        page.locator("#login-button").click()
        expect(page.locator("#login-message")).to_contain_text("Wrong token")
        page.screenshot(path=shots / "01-login-refused.png")
        login(page, live_server.base_url, live_server.token)

        # paths get wide inputs: in a column of three, a data dir's absolute path was cut after ~22 characters
        width = {name: page.locator(f"#cfg-{name}").bounding_box()["width"]
                 for name in ("base_model", "init_adapter", "data_path", "lora_rank")}
        assert min(width["base_model"], width["init_adapter"], width["data_path"]) > 2.5 * width["lora_rank"], width

        # the GPU size defaults to what the workers report (the scripted worker has a 24 GB GPU)
        expect(field(page, "gpu-mem")).to_have_value("24")
        set_field(page, "cfg-base_model", "models/tiny")
        set_field(page, "cfg-data_path", "demo.jsonl")
        set_field(page, "cfg-max_steps", "40")
        choose(page, "preset-model", "0.5B")
        page.locator("#get-presets").click()
        expect(page.locator("#presets-table")).to_contain_text("many short branches")
        expect(page.locator("#presets-table")).to_contain_text("Presets for 0.5B on a 24 GB GPU")
        page.locator("#preset-choice").get_by_text("many short branches").click()
        page.locator("#apply-preset").click()
        expect(field(page, "cfg-rope_2d_ratio")).to_have_value("0.65")
        expect(field(page, "cfg-max_branches_per_sample")).to_have_value("16")
        expect(page.locator("#estimate-md")).to_contain_text("Estimated peak")
        page.locator("#preview-command").click()
        expect(page.locator("#command-preview")).to_contain_text("trainer_core.train")
        expect(page.locator("#command-preview")).to_contain_text("--rope_2d_ratio 0.65")
        page.screenshot(path=shots / "02-new-job-preset.png", full_page=True)

        # a value out of its bounds is named, in the status line, not as a nameless toast
        set_field(page, "cfg-batch_size", "-4")
        page.locator("#preview-command").click()
        expect(page.locator("#submit-status")).to_contain_text("batch_size: Input should be greater than or equal to 1")
        set_field(page, "cfg-batch_size", "16")

        # save the form as YAML (one click saves the file; its link stays), load a broken one (refused by name),
        # then another
        with page.expect_download(timeout=30_000) as download:
            page.locator("#save-yaml").click()
        assert download.value.suggested_filename == "paratrain.yaml"
        assert "rope_2d_ratio: 0.65" in Path(download.value.path()).read_text()
        expect(page.locator("#saved-yaml")).to_contain_text("paratrain")
        broken = shots / "broken.yaml"
        broken.write_text("batch_size: lots\n")
        load_yaml_input(page).set_input_files(str(broken))
        expect(page.get_by_text("batch_size: Input should be a valid integer").first).to_be_visible()
        expect(field(page, "cfg-batch_size")).to_have_value("16")
        other = shots / "other.yaml"
        other.write_text("base_model: models/tiny\ndata_path: demo.jsonl\nlora_rank: 4\nmax_steps: 40\n"
                         "rope_2d_ratio: 0.65\nmax_branches_per_sample: 16\nmax_seq_len: 256\n"
                         "batch_by_samples: true\nbatch_size: 1\naccumulation_steps: 4\njob: {gpus: 1}\n")
        load_yaml_input(page).set_input_files(str(other))
        expect(field(page, "cfg-lora_rank")).to_have_value("4")
        expect(field(page, "cfg-max_steps")).to_have_value("40")

        # submit: the UI switches to the Jobs tab with the new job selected. A fresh heartbeat first: on busy
        # cores the steps above can outlast the lease TTL since registering (CI at 2183ccc: "No worker is online")
        scripted_worker.heartbeat([])
        page.locator("#submit-job").click()
        expect(page.locator("#submit-status")).to_contain_text("is queued")
        expect(page.locator("#submit-status")).not_to_contain_text("⚠")  # the worker has the GPU it asks for
        expect(page.locator("#job-summary")).to_contain_text("Job #1", timeout=20_000)
        # a queued job can be cancelled, not retried, and has no adapter yet
        expect(page.locator("#cancel-job")).to_be_enabled()
        expect(page.locator("#retry-job")).to_be_disabled()
        expect(page.locator("#download-adapter")).to_be_disabled()
        job = scripted_worker.claim()
        assert job and job["id"] == 1
        # the validation loss before training (step 0) is a single point: drawn as a dot, before any line is.
        # Vega-Lite names each point it draws (aria-label); the training curve's are transparent hover targets.
        scripted_worker.report(1, range(0, 1), total_steps=60, val_every=3)
        validation_dots = page.locator('#loss-plot path[aria-roledescription="point"][aria-label*="curve: validation"]')
        expect(validation_dots).to_have_count(1)
        expect(validation_dots).to_have_attribute("opacity", "1")
        assert validation_dots.bounding_box()["width"] >= 5
        expect(page.locator("#loss-plot")).to_contain_text("Loss (validation at step 0: ")
        page.screenshot(path=shots / "03a-jobs-validation-before-training.png", full_page=True)

        def train() -> None:  # one metric point every 0.4 s, like a worker forwarding the trainer's lines
            step = 0
            while not (stop.is_set() or pause.is_set()) and step < 60:
                step += 1
                scripted_worker.report(1, range(step, step + 1), total_steps=60, val_every=3)
                reported.append(step)
                time.sleep(0.4)

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        first = wait_for(lambda: (n := curve_points(page)) >= 2 and n)
        later = wait_for(lambda: (n := curve_points(page)) >= first + 3 and n)
        assert later > first
        # latency: a point reported now is on the curve within 2 s
        pause.set()
        trainer.join(timeout=5)
        last = wait_for(lambda: (n := curve_points(page)) == len(reported) and n)
        reported_at = time.time()
        scripted_worker.report(1, range(last + 1, last + 2), total_steps=60)
        wait_for(lambda: curve_points(page) == last + 1, timeout=5, interval=0.05)
        assert time.time() - reported_at < 2.0
        expect(page.locator("#log-tail")).to_contain_text(re.compile(r"step \d+ loss"))
        # the validation loss is a curve of its own, named in the legend and the title
        expect(page.locator("#loss-plot")).to_contain_text("validation")
        expect(page.locator("#loss-plot")).to_contain_text("training")
        expect(page.locator("#loss-plot")).to_contain_text(re.compile(r"validation at step \d*[0369]: "))
        expect(validation_dots).to_have_count(1 + last // 3)   # step 0 and every third step, each a dot
        expect(page.locator("#job-summary")).to_contain_text("validation loss")
        page.screenshot(path=shots / "03-jobs-live-curve.png", full_page=True)

        # reload: logged back in, the same job reopened, the whole curve fetched again, and a form edit that
        # was neither previewed nor submitted is still there
        tab(page, "New job")
        set_field(page, "cfg-warmup_ratio", "0.07")
        page.wait_for_timeout(4000)   # the form is saved to the browser every 3 s (ui.app.FORM_SAVE_S)
        tab(page, "Jobs")
        before = curve_points(page)
        page.reload()
        page.locator("#main-panel").wait_for(state="visible")
        expect(page.locator("#job-summary")).to_be_visible()   # the Jobs tab, open before the reload
        after = wait_for(lambda: (n := curve_points(page)) >= before and n)
        assert after >= before
        expect(page.locator("#jobs-table")).to_contain_text("running")
        page.screenshot(path=shots / "04-after-reload.png", full_page=True)

        # a second job, for more GPUs than any worker has: submitted with a warning, cancelled from the UI
        # while queued; the form came back as it was last edited
        tab(page, "New job")
        expect(field(page, "cfg-data_path")).to_have_value("demo.jsonl")
        expect(field(page, "cfg-warmup_ratio")).to_have_value("0.07")
        expect(field(page, "cfg-rope_2d_ratio")).to_have_value("0.65")
        page.locator("#group-output button.label-wrap").click()
        set_field(page, "cfg-name", "second")
        set_field(page, "job-gpus", 2)
        scripted_worker.heartbeat([1])  # online: the warning is about its one GPU, not about a lost worker
        page.locator("#submit-job").click()
        expect(page.locator("#submit-status")).to_contain_text("No online worker has 2 GPUs (the most is 1)")
        expect(page.locator("#job-summary")).to_contain_text("Job #2")
        page.locator("#cancel-job").click()
        expect(page.locator("#job-summary")).to_contain_text("cancelled")
        expect(page.locator("#jobs-table")).to_contain_text("cancelled")
        expect(page.locator("#cancel-job")).to_be_disabled()  # cancelling it again would be a 409
        expect(page.locator("#retry-job")).to_be_enabled()

        # compare two jobs' curves: a third job (CPU) gets a short curve of its own
        third = httpx.post(f"{live_server.base_url}/api/jobs", headers={"Authorization": f"Bearer {live_server.token}"},
                           json={"config": {"base_model": "models/tiny", "data_path": "demo.jsonl", "name": "third"},
                                 "gpus": 0}).json()
        assert scripted_worker.claim()["id"] == third["id"]
        scripted_worker.report(third["id"], range(1, 6), total_steps=5)
        tab(page, "Compare")
        expect(page.locator("#compare-info")).to_contain_text("Pick jobs above")   # not an empty frame alone
        choose(page, "compare-picker", "#1")
        expect(page.locator("#compare-plot")).to_contain_text("#1 paratrain")
        choose(page, "compare-picker", "#3")
        expect(page.locator("#compare-info")).to_contain_text("#3 third: 5 points")
        # how each ended, and the settings in which they differ (the form's job and the API's)
        expect(page.locator("#compare-table")).to_contain_text("lowest val loss")
        expect(page.locator("#compare-table")).to_contain_text("#3 third")
        expect(page.locator("#compare-table")).to_contain_text("max_seq_len")
        # both are drawn, each with its legend entry (Gradio once kept only the first job's)
        expect(page.locator("#compare-plot")).to_contain_text("#3 third")
        expect(page.locator("#compare-plot")).to_contain_text("#1 paratrain")
        dots = page.locator('#compare-plot path[aria-roledescription="point"][opacity="1"]')
        expect(dots).to_have_count(0)   # training losses are lines
        page.screenshot(path=shots / "05-compare.png", full_page=True)
        # against the tokens each has seen (from here on: the validation losses below too)
        page.locator("#compare-against").get_by_text("Tokens seen", exact=True).click()
        expect(page.locator("#compare-plot")).to_contain_text("tokens seen")
        expect(page.locator("#compare-plot")).to_contain_text("10k")   # 2,048 a step: an SI-formatted axis
        expect(page.locator("#compare-info")).to_contain_text("#3 third: 5 points")
        # the validation losses: job #1 has them, the third job none, which its note says
        page.locator("#compare-curve").get_by_text("Validation loss", exact=True).click()
        expect(page.locator("#compare-info")).to_contain_text("#3 third: 0 points, running (no validation set)")
        expect(page.locator("#compare-plot")).to_contain_text("Validation loss of 1 job")   # the one drawn
        expect(dots).to_have_count(1 + last // 3)   # job #1's validation losses, a dot each
        page.screenshot(path=shots / "05b-compare-validation.png", full_page=True)
        page.locator("#compare-against").get_by_text("Training time", exact=True).click()
        # a run of under 2 minutes is drawn in seconds (0.02-minute ticks read badly)
        expect(page.locator("#compare-plot")).to_contain_text("training time (seconds)")
        expect(dots).to_have_count(1 + last // 3)
        page.screenshot(path=shots / "05c-compare-against-time.png", full_page=True)

        # the first job crashes: its summary shows the traceback's cause, and it can be retried, not cancelled
        scripted_worker.finish(1, exit_code=1, failure_class="crash", failure_reason=CRASH)
        tab(page, "Jobs")
        choose(page, "job-picker", "#1")
        expect(page.locator("#job-summary")).to_contain_text("failed")
        expect(page.locator("#job-summary")).to_contain_text("ValueError: line 7 has no text")
        expect(page.locator("#job-summary")).to_contain_text("<frozen runpy>")
        expect(page.locator("#cancel-job")).to_be_disabled()
        expect(page.locator("#retry-job")).to_be_enabled()
        expect(page.locator("#download-adapter")).to_be_enabled()   # it measured a validation loss: adapter_best/
        page.screenshot(path=shots / "06-failed-job.png", full_page=True)

        # its settings are shown, and Edit as new job puts them back into the form, whatever it held since
        tab(page, "New job")
        set_field(page, "cfg-lora_rank", "12")
        tab(page, "Jobs")
        page.locator("#job-settings-box button.label-wrap").click()
        expect(page.locator("#job-settings")).to_contain_text("lora_rank: 4")
        page.screenshot(path=shots / "06b-job-settings.png", full_page=True)
        page.locator("#edit-job").click()
        expect(field(page, "cfg-lora_rank")).to_be_visible()    # the New job tab, refilled
        expect(field(page, "cfg-lora_rank")).to_have_value("4")
        expect(field(page, "cfg-max_seq_len")).to_have_value("256")

        # dataset check of the form's data
        tab(page, "Dataset")
        page.locator("#check-dataset").click()
        expect(page.locator("#dataset-summary")).to_contain_text("records")
        page.screenshot(path=shots / "07-dataset.png", full_page=True)

        # the workers: the scripted one, online, with its GPU and the job it runs (a fresh heartbeat: on busy
        # cores the steps above can outlast the lease TTL since the last one)
        scripted_worker.heartbeat([1])
        tab(page, "Workers")
        expect(page.locator("#workers-table")).to_contain_text("scripted")
        expect(page.locator("#workers-table")).to_contain_text("1 × Fake GPU")
        expect(page.locator("#workers-info")).to_contain_text("1 of 1 worker online")
        page.screenshot(path=shots / "08-workers.png", full_page=True)

        # the demo job's settings in one click (the form's defaults are a real run's: minutes of a flat loss on
        # the tiny model)
        tab(page, "New job")
        page.locator("#demo-job").click()
        expect(field(page, "cfg-learning_rate")).to_have_value("0.003")
        expect(field(page, "cfg-val_ratio")).to_have_value("0.1")
        expect(field(page, "cfg-base_model")).to_have_value("models/tiny-qwen2")
        expect(field(page, "job-gpus")).to_have_value("0")
        stop.set()
        browser.close()
    assert not console_errors, console_errors
    trainer.join(timeout=5)
    # Gradio prints a handler's exception (a poll that returned one value too few) and the page goes on: the
    # server, in this process, must have printed none
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + printed.out, (printed.err + printed.out)[-5000:]
