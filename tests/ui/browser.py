"""Helpers for the Playwright tests: Debian chromium (never `playwright install`) and Gradio-aware locators."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OUTPUT_DIR = REPO / "test-output" / "ui"
CHROMIUM = os.environ.get("PARATRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
LAPTOP = {"width": 1366, "height": 768}


def require_chromium() -> None:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api")


def output_dir(test_name: str) -> Path:
    path = OUTPUT_DIR / re.sub(r"[^A-Za-z0-9_.-]", "_", test_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def field(page, elem_id: str):
    """The text/number input inside a Gradio component with `elem_id`."""
    return page.locator(f"#{elem_id}").locator("input:not([type=checkbox]):not([type=range]), textarea").first


def set_field(page, elem_id: str, value) -> None:
    box = field(page, elem_id)
    box.fill(str(value))
    box.press("Tab")  # Gradio reads the value on blur/change


def choose(page, elem_id: str, option_text: str) -> None:
    """Pick an option of a gr.Dropdown by (part of) its label."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=re.compile(re.escape(option_text))).first.click()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def login(page, base_url: str, token: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    main_panel = page.locator("#main-panel")
    messages = []
    for attempt in range(2):
        page.goto(f"{base_url}/ui/")
        field(page, "login-token").fill(token)
        page.locator("#login-button").click()
        try:
            main_panel.wait_for(state="visible", timeout=30_000)
            return
        except PlaywrightTimeout:
            # Twice in CI runs on 2 busy cores (never locally) the login event stayed pending: its elapsed-time
            # counter ("40.1s") was all the message showed, and clicking again does nothing while an event is
            # pending. Not understood yet; a user would reload the page, so the test does, once. A second miss
            # is a failure, with what the page showed both times.
            messages.append(page.locator("#login-message").inner_text())
    raise AssertionError(f"not logged in after two page loads; the login message read {messages!r}")


def curve_state(page) -> tuple[int, int]:
    """(points on the loss curve, its last step), read at one instant."""
    text = page.locator("#curve-info").inner_text()
    points, last = re.search(r"(\d+) points?", text), re.search(r"last step (\d+)", text)
    return (int(points.group(1)) if points else 0), (int(last.group(1)) if last else 0)


def curve_points(page) -> int:
    return curve_state(page)[0]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    """Poll until predicate() is truthy and return its value; fail after timeout seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
