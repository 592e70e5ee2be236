"""What every tab needs: the server's base URL and the session's state (the user's token)."""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import gradio as gr

from ui.api import ApiClient, ApiError


class NotLoggedIn(ApiError):
    def __init__(self) -> None:
        super().__init__(401, "Log in first.")


@dataclass
class UiContext:
    base_url: str
    session: gr.State  # per browser session: {"token": str | None}

    def client(self, session: dict[str, Any] | None) -> ApiClient:
        token = (session or {}).get("token")
        if not token:
            raise NotLoggedIn()
        return ApiClient(self.base_url, token)


SCRATCH_MAX_AGE_S = 3600


def warn(message: str) -> None:
    """A warning toast showing `message` as text: toasts render HTML, so an error's "<stream end>" (a YAML
    parser's) or "<frozen runpy>" would vanish as a tag."""
    gr.Warning(html.escape(message, quote=False))


def scratch_file(name: str) -> str:
    """A fresh path named `name` for a file handed to the browser (a saved YAML, an adapter zip).

    Gradio copies returned files into its own cache (cleaned by Blocks(delete_cache=...)), so ours are
    only needed for a moment: anything older than an hour in our scratch dir is removed on each call."""
    root = os.path.join(tempfile.gettempdir(), "paratrain-ui")
    os.makedirs(root, exist_ok=True)
    now = time.time()
    for entry in os.scandir(root):
        try:
            if now - entry.stat().st_mtime > SCRATCH_MAX_AGE_S:
                shutil.rmtree(entry.path, ignore_errors=True)
        except FileNotFoundError:  # another session pruned it first
            pass
    return os.path.join(tempfile.mkdtemp(dir=root), name)


def parse_api_time(timestamp: str | None) -> datetime | None:
    """A timestamp of the API (UTC, ISO 8601, with or without its offset) as an aware datetime."""
    if not timestamp:
        return None
    at = datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# The browser saves a gr.File's file (its value: {url, orig_name, ...}) as if its link were clicked.
SAVE_FILE_JS = """(file) => {
  if (file && file.url) {
    const link = document.createElement("a");
    link.href = file.url;
    link.download = file.orig_name || "";
    document.body.appendChild(link);
    link.click();
    link.remove();
  }
}"""
