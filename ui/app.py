"""The paratrain web UI: a Gradio Blocks app mounted into the server at /ui.

It is a client of the REST API like any script (docs/API.md; docs/UI.md): the user's token is checked by
the API, kept in the session's gr.State, and remembered in the browser (gr.BrowserState, encrypted) so a
reload logs straight back in and re-selects the job that was open. Nothing here touches the database or
starts processes; every session's data is its own.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from ui.api import ApiClient, ApiError  # noqa: E402
from ui.context import UiContext, warn  # noqa: E402
from ui.form import job_values  # noqa: E402
from ui.tabs.compare import CompareTab, create_compare_tab  # noqa: E402
from ui.tabs.dataset import DatasetTab, create_dataset_tab  # noqa: E402
from ui.tabs.jobs import (JobsTab, create_jobs_tab, parse_job_id, picker_update,  # noqa: E402
                          train_on_values)
from ui.tabs.memory import gpu_mem_update  # noqa: E402
from ui.tabs.submit import SubmitTab, create_submit_tab  # noqa: E402
from ui.tabs.workers import WorkersTab, create_workers_tab  # noqa: E402
from ui.workers import cpu_only, known_workers  # noqa: E402

UI_PATH = "/ui"
BROWSER_KEY = "paratrain-ui"
BROWSER_FORM_KEY = "paratrain-ui-form"
BROWSER_TAB_KEY = "paratrain-ui-tab"
FORM_SAVE_S = 3.0   # how often an edited form is saved to the browser (a reload keeps it)
MAX_UPLOAD = "1mb"
# threads for UI callbacks, apart from the API's (mount_ui); they mostly wait on the API, so they are cheap
UI_THREADS = 64
# Laptop screens: use the full width, tighten Gradio's generous spacing.
CSS = """
.gradio-container { max-width: 100% !important; padding: 8px 16px !important; }
#login-panel { max-width: 520px; margin: 48px auto; }
#header h2 { margin: 0; }
#job-summary p, #estimate-md p { margin: 2px 0; }
/* failure reasons and errors wrap instead of running off the right edge */
#job-summary pre, #job-summary code, #submit-status { white-space: pre-wrap !important; overflow-wrap: anywhere; }
/* narrow windows: the jobs table scrolls sideways instead of breaking its headers mid-word ("atte mpt") */
#jobs-table th, #jobs-table th * { white-space: nowrap !important; word-break: keep-all !important;
                                   overflow-wrap: normal !important; }
footer { display: none !important; }
/* the loss charts (ui/charts.py): the width of their box, their text in the theme's font and colour */
.curve-chart .vega-embed { width: 100%; }
.curve-chart .vega-embed text { font-family: var(--font); fill: var(--body-text-color); }
/* samples after training: the three texts side by side, each wrapping in its third */
#job-samples table { width: 100%; table-layout: fixed; font-size: 13px; margin-bottom: 12px; }
#job-samples th:first-child, #job-samples td:first-child { width: 56px; }
#job-samples td { vertical-align: top; white-space: pre-wrap; overflow-wrap: anywhere; }
"""


def quiet_http_client_logs() -> None:
    """httpx logs every request at INFO; the UI polls the API every second or two per open tab, which would
    flood the server's log (`paratrain serve` logs at INFO). Its warnings still show."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass
class ParatrainUI:
    blocks: gr.Blocks
    login_panel: gr.Column
    main_panel: gr.Column
    token: gr.Textbox
    login_button: gr.Button
    login_message: gr.Markdown
    logout_button: gr.Button
    tabs: gr.Tabs
    submit: SubmitTab
    dataset: DatasetTab
    jobs: JobsTab
    compare: CompareTab
    workers: WorkersTab


def build_ui(api_base_url: str) -> ParatrainUI:
    quiet_http_client_logs()
    # delete_cache: Gradio's copies of downloaded files (YAML, adapter zips) go after a day
    with gr.Blocks(title="paratrain", delete_cache=(3600, 86400)) as blocks:
        session = gr.State({"token": None})
        remembered = gr.BrowserState({"token": None, "job_id": None}, storage_key=BROWSER_KEY)
        # the form apart: its periodic save must never write back a token or job that changed meanwhile
        remembered_form = gr.BrowserState({}, storage_key=BROWSER_FORM_KEY)
        remembered_tab = gr.BrowserState("submit", storage_key=BROWSER_TAB_KEY)   # a reload reopens it
        ctx = UiContext(api_base_url, session)
        with gr.Row(elem_id="header"):
            gr.Markdown("## paratrain · parallel-branch LoRA fine-tuning")
            logout_button = gr.Button("Log out", size="sm", visible=False, scale=0, min_width=90,
                                      elem_id="logout")
        with gr.Column(visible=True, elem_id="login-panel") as login_panel:
            token = gr.Textbox(label="API token", type="password", elem_id="login-token",
                               info="`paratrain serve` shows it when it starts on a terminal; it is in "
                                    "<data_dir>/token (default .paratrain/token).")
            login_button = gr.Button("Log in", variant="primary", elem_id="login-button")
            login_message = gr.Markdown(elem_id="login-message")
        with gr.Column(visible=False, elem_id="main-panel") as main_panel:
            with gr.Tabs(elem_id="tabs") as tabs:
                with gr.Tab("New job", id="submit", elem_id="tab-submit") as submit_tab:
                    submit = create_submit_tab(ctx)
                with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset") as dataset_tab:
                    dataset = create_dataset_tab(ctx, submit.form, submit.memory.tokens_per_text)
                with gr.Tab("Jobs", id="jobs", elem_id="tab-jobs") as jobs_tab:
                    jobs = create_jobs_tab(ctx)
                with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_tab:
                    compare = create_compare_tab(ctx)
                with gr.Tab("Workers", id="workers", elem_id="tab-workers") as workers_tab:
                    workers = create_workers_tab(ctx)
        tab_ids = {tab: tab.id for tab in (submit_tab, dataset_tab, jobs_tab, compare_tab, workers_tab)}

        form = submit.form
        # The form as last edited survives a reload: saved every few seconds when it changed (a save on every
        # change event would be one request per input each time a preset or a file fills the form, ~40). The
        # login starts the timer in the answer that fills the form: a tick before it would save the defaults,
        # which a reload then restored over the login's own (gpus 0 on a CPU-only setup).
        form_saver = gr.Timer(FORM_SAVE_S, active=False)
        logged_in_outputs = [session, remembered, login_panel, main_panel, logout_button, login_message, form_saver,
                             submit.memory.gpu_mem, tabs, jobs.picker, *form.inputs]
        message_at = logged_in_outputs.index(login_message)

        def only(message: str | None = None, forget: bool = False) -> list[Any]:
            """Outputs that change nothing but the login message (and maybe forget the saved token)."""
            out: list[Any] = [gr.skip()] * len(logged_in_outputs)
            out[message_at] = message if message is not None else gr.skip()
            if forget:
                out[1] = {"token": None, "job_id": None}
            return out

        def enter(token_value: str, saved: dict[str, Any], saved_form: Any, tab: Any = None) -> list[Any]:
            client = ApiClient(api_base_url, token_value)
            client.check_token()  # raises ApiError
            job_id = parse_job_id(saved.get("job_id"))
            saved_form = saved_form if isinstance(saved_form, dict) else {}
            workers = known_workers(client)
            # on a CPU-only setup a job asking for a GPU would wait forever; a saved form keeps its own gpus
            defaults = {"gpus": 0} if workers is not None and cpu_only(workers) else {}
            return [{"token": token_value}, {**saved, "token": token_value, "job_id": job_id},
                    gr.update(visible=False), gr.update(visible=True), gr.update(visible=True), "",
                    gr.Timer(active=True), gpu_mem_update(workers), gr.Tabs(selected=tab) if tab in tab_ids.values() else gr.skip(),
                    picker_update(client, job_id), *form.updates({**defaults, **saved_form})]

        def login(token_value, remembered_value, form_value):
            token_value = (token_value or "").strip()
            if not token_value:
                return only("Enter the token first.")
            try:
                return enter(token_value, {**(remembered_value or {}), "job_id": None}, form_value)
            except ApiError as e:
                return only("✖ Wrong token: the server did not accept it." if e.status == 401 else f"✖ {e}")

        def restore(remembered_value, form_value, tab_value):
            """Page (re)load: log back in with the remembered token, refill the form as it was last edited and
            reopen the tab and the job that were open."""
            saved = remembered_value or {}
            if not saved.get("token"):
                return only()
            try:
                return enter(saved["token"], saved, form_value, tab_value)
            except ApiError as e:
                if e.status == 401:  # the token changed: forget it
                    return only("Your saved token is no longer valid: log in again.", forget=True)
                return only(f"✖ {e}")

        def logout():
            """Forget the token and the open job; the form (its own BrowserState) stays for the next login."""
            return ({"token": None}, {"token": None, "job_id": None}, gr.update(visible=True),
                    gr.update(visible=False), gr.update(visible=False), "Logged out.", gr.Timer(active=False))

        def remember_job(job_id, remembered_value):
            return {**(remembered_value or {}), "job_id": parse_job_id(job_id)}

        def remember_form(session_value, form_value, *form_args):
            """Save the form if it changed, once a login filled it: before that (logged out, or a reload whose
            login failed) it holds the defaults, not the user's work."""
            values = form.values(form_args)
            if not (session_value or {}).get("token") or form_value == values:
                return gr.skip()
            return values

        def open_submitted(session_value, job_id):
            if job_id is None:
                return gr.skip(), gr.skip(), gr.skip()
            try:
                update = picker_update(ctx.client(session_value), int(job_id))
            except ApiError:
                return gr.skip(), gr.skip(), gr.skip()
            return update, gr.Tabs(selected="jobs"), "jobs"

        def into_form(session_value, selected, fill, failed: str):
            """`fill(client, job_id)` -> (form values, what to say) into the New job form, which is shown; a
            toast with `failed` and the reason when the job cannot be read (or is of an older schema)."""
            job_id = parse_job_id(selected)
            try:
                values, done = fill(ctx.client(session_value), job_id)
            except (ApiError, ValueError, TypeError, KeyError) as e:
                warn(f"{failed.format(job_id=job_id)}: {e}")
                return [*form.updates({}), gr.skip(), gr.skip()]
            gr.Info(done)
            return [*form.updates(values), gr.Tabs(selected="submit"), "submit"]

        def edit_job(session_value, selected):
            """The selected job's settings into the New job form, to change and submit as a new job."""
            return into_form(session_value, selected, lambda client, job_id: (
                job_values(client.get_job(job_id)), f"Job #{job_id}'s settings are in the form: change them and "
                                                    "submit."), "Cannot open job #{job_id}'s settings")

        def train_on_job(session_value, selected):
            """A new job in the New job form that starts from the selected job's adapter, with its settings."""
            def fill(client, job_id):
                values, which = train_on_values(client.get_job(job_id), client.best_adapter(job_id))
                return values, (f"A new job starting from job #{job_id}'s {which} (init_adapter) is in the form, "
                                "with its settings: change data_path and anything else, then submit.")
            return into_form(session_value, selected, fill, "Cannot start from job #{job_id}'s adapter")

        # the job table is filled at once after logging in, not at the next timer tick
        refresh_jobs = (jobs.refresh_fn, session, [jobs.table, jobs.table_ids, jobs.picker])
        login_button.click(login, [token, remembered, remembered_form], logged_in_outputs).then(*refresh_jobs)
        token.submit(login, [token, remembered, remembered_form], logged_in_outputs).then(*refresh_jobs)
        logout_button.click(logout, None, logged_in_outputs[:7], queue=False)
        blocks.load(restore, [remembered, remembered_form, remembered_tab], logged_in_outputs).then(*refresh_jobs)
        for tab, tab_id in tab_ids.items():   # (a tab chosen by the code below is remembered there)
            tab.select(lambda tab_id=tab_id: tab_id, None, remembered_tab, queue=False)
        workers_tab.select(workers.refresh_fn, session, [workers.table, workers.info], show_progress="hidden")
        jobs.picker.change(remember_job, [jobs.picker, remembered], remembered, queue=False)
        submit.submitted_job_id.change(open_submitted, [session, submit.submitted_job_id],
                                       [jobs.picker, tabs, remembered_tab])
        jobs.edit_button.click(edit_job, [session, jobs.picker], [*form.inputs, tabs, remembered_tab])   # queued: toast
        jobs.train_on_button.click(train_on_job, [session, jobs.picker], [*form.inputs, tabs, remembered_tab])
        form_saver.tick(remember_form, [session, remembered_form, *form.inputs], remembered_form, queue=False,
                        show_progress="hidden")
    return ParatrainUI(blocks, login_panel, main_panel, token, login_button, login_message, logout_button, tabs,
                       submit, dataset, jobs, compare, workers)


def mount_ui(app: FastAPI, api_base_url: str, path: str = UI_PATH) -> FastAPI:
    """Mount the UI at `path` of the server's FastAPI app; `api_base_url` is where the UI reaches the REST API
    (normally the server itself, e.g. http://127.0.0.1:8000). The server redirects `/` here."""
    ui = build_ui(api_base_url)
    # Left at 40, Gradio runs callbacks on Starlette's shared pool of 40 threads, the one the API's own handlers
    # run on. Every UI callback waits on an API call: with 40 of them waiting (a dozen open tabs when the
    # server is slow), the API, worker heartbeats included, could answer nobody until the UI's calls timed out.
    # Any other number gives the UI a pool of its own (set before queue(), which sizes the queue from it).
    ui.blocks.max_threads = UI_THREADS
    ui.blocks.queue(default_concurrency_limit=16)  # one slow call of one user must not block the others
    # the only upload is a job's YAML: Gradio's upload route (open before login) takes nothing bigger
    return gr.mount_gradio_app(app, ui.blocks, path=path, theme=gr.themes.Soft(), css=CSS, footer_links=[],
                               max_file_size=MAX_UPLOAD)
