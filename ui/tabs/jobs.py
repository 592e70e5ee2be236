"""Jobs tab: the job table (GET /api/jobs, every 2 s), and for the selected job its live loss and
learning-rate curves, log tail and cancel / retry / download-adapter actions.

Live updates poll GET /api/jobs/{id}/metrics?since_step=<last> once a second (a gr.Timer ticks only while
the page is open, so a closed browser costs the server nothing). The points live in this session's
gr.State; a reload starts a new session that fetches the whole curve again from step 0, so nothing is lost
and training is never touched by the UI.
"""

from __future__ import annotations

import html
import json
import re
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd
import yaml

from trainer_core.config import BEST_ADAPTER_DIR, JOB_SET_FIELDS, SAMPLES_FILE
from ui.api import ApiClient, ApiError, improvement_text, stopped_early
from ui.charts import PlotData, curve_chart
from ui.context import (SAVE_FILE_JS, UiContext, fmt_duration, parse_api_time, scratch_file,
                        warn)
from ui.form import job_values, to_yaml
from ui.jobtext import STATE_ICONS, failure_kind, fmt_number, progress_text, readable_lines, state_text
from ui.workers import capacity_warning, known_workers

TABLE_COLUMNS = ["id", "name", "state", "progress", "ETA", "tokens/s", "GPU", "attempt", "loss", "peak GB"]
LOG_TAIL_LINES = 200
# About ten jobs before the table scrolls (a row is ~35 px); the selected job's details follow below it.
TABLE_HEIGHT_PX = 420
# A traceback's cause is at its end: a long failure reason shows its first line (the worker's headline,
# e.g. "exit code 1") and its last lines.
FAILURE_TAIL_LINES = 15
FINAL_STATES = {"succeeded", "failed", "cancelled"}
SAMPLE_MAIN_CHARS = 400   # a sample's main text is shown as its last this many characters
MAX_PAGES_REMEMBERED = 1000   # pages whose last selection the poll guard keeps


@dataclass
class JobsTab:
    table: gr.Dataframe
    table_ids: gr.State
    picker: gr.Dropdown
    refresh_timer: gr.Timer
    poll_timer: gr.Timer
    summary: gr.Markdown
    curve_info: gr.Markdown
    loss_plot: gr.Plot   # a Vega-Lite chart (ui/charts.py): the validation loss' points are dots
    lr_plot: gr.Plot   # as loss_plot
    log_tail: gr.HTML
    cancel_button: gr.Button
    retry_button: gr.Button
    download_button: gr.Button
    edit_button: gr.Button   # app.py wires it and train_on_button to the New job form
    train_on_button: gr.Button
    settings: gr.Code
    adapter_file: gr.File
    samples_box: gr.Accordion   # shown for a job that wrote samples.jsonl
    samples: gr.HTML
    watch: gr.State  # {"job_id", "points": [Metric], "last_step", "log_offset", "log_lines", "final", "best"}
    refresh_fn: Callable[..., tuple] | None = None  # (session) -> (table, table_ids, picker): for app wiring


def job_label(job: dict[str, Any]) -> str:
    return f"#{job['id']} {job.get('name') or job['config'].get('name', '')} ({job['state']})"


def gpu_text(job: dict[str, Any]) -> str:
    if not job.get("gpus"):
        return "CPU"
    ids = job.get("gpu_ids")
    where = f" on worker {job['worker_id']}" if job.get("worker_id") else ""
    return (f"{','.join(str(i) for i in ids)}{where}" if ids else f"{job['gpus']} wanted")


def eta_text(job: dict[str, Any]) -> str:
    """The last reported ETA, while it means something: a job that ended keeps its last report. With early
    stopping it is the time to the last step, at most ('≤ 1:40')."""
    if job["state"] != "running" or not (eta := fmt_duration(job.get("eta_s"))):
        return ""
    return f"≤ {eta}" if job.get("config", {}).get("early_stop_patience") else eta


def table_rows(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    return [[j["id"], j.get("name") or j["config"].get("name", ""), state_text(j),
             progress_text(j), eta_text(j),
             fmt_number(j.get("tokens_per_s")), gpu_text(j), f"{j.get('attempt', 1)}/{j.get('max_attempts') or '?'}",
             fmt_number(j.get("last_loss"), 4), fmt_number(j.get("peak_mem_gb"), 1)] for j in jobs]


PICK_HINT = "Pick a job in the table or the list above: its progress, loss and learning-rate curves and log show here."


def wait_reason(client: ApiClient, job: dict[str, Any]) -> str | None:
    """Why a queued job cannot start on the workers online now; None when it only waits its turn (or is not
    queued). The job's log says the same, but the summary is what a user reads."""
    if job.get("state") != "queued":
        return None
    workers = known_workers(client)
    return capacity_warning(workers, job.get("gpus", 1), job.get("nodes", 1)) if workers is not None else None


# What each failure class means for the user's next step (server/models.py FailureClass).
FAILURE_ADVICE = {
    "data": "bad data or settings (below): the same job fails the same way; fix what it names and *Retry*, or "
            "change the settings with *Edit as new job*",
    # exit 4, also of class data (the same settings diverge again); Retry keeps the learning rate
    "diverged": "the training diverged (a NaN or infinite loss): *Edit as new job* with a lower learning_rate or "
                "the trainer's other advice below; *Retry* would diverge again",
    "oom": "out of memory: *Edit as new job* with a smaller batch_size or max_seq_len, or gradient_checkpointing on",
    "crash": "the trainer crashed (its reason below); *Retry* resumes from the last checkpoint",
    "lost": "its worker stopped answering too often; *Retry* resumes from the last checkpoint",
}


def when_text(job: dict[str, Any]) -> str:
    """'queued 2026-11-29 10:02:11 UTC · started 10:02:15 · ran 1:05' from the API's UTC timestamps."""
    def parse(key: str) -> datetime | None:
        try:
            return parse_api_time(job.get(key))
        except ValueError:
            return None

    created, started, finished = parse("created_at"), parse("started_at"), parse("finished_at")
    if created is None:
        return ""
    def at(moment: datetime) -> str:   # the date again only when it is another day than the queueing's
        return f"{moment:%H:%M:%S}" if moment.date() == created.date() else f"{moment:%Y-%m-%d %H:%M:%S}"

    parts = [f"queued {created:%Y-%m-%d %H:%M:%S} UTC"]
    if started is not None:
        parts.append(f"started {at(started)}")
    if finished is not None:
        parts.append(f"ended {at(finished)}")
        if started is not None:
            parts.append(f"ran {fmt_duration((finished - started).total_seconds())}")
    return " · ".join(parts)


def validation_text(cfg: dict[str, Any]) -> str:
    """' · validation 5% held out' or ' · validation FILE' (and its early stop), or '' without a validation set."""
    patience = cfg.get("early_stop_patience")
    stop = f", early stop after {patience} validations without {improvement_text(cfg)}" if patience else ""
    if cfg.get("val_data_path"):
        return f" · validation {cfg['val_data_path']}{stop}"
    if cfg.get("val_ratio"):
        return f" · validation {cfg['val_ratio'] * 100:.3g}% held out{stop}"
    return ""


def last_point(points: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The last point that has `key` (a validation loss is at some steps only; a step-0 point has no loss)."""
    return next((p for p in reversed(points) if p.get(key) is not None), None)


def last_validation_step(points: list[dict[str, Any]]) -> int | None:
    last = last_point(points, "val_loss")
    return last["step"] if last else None


def job_samples(client: ApiClient, job_id: int) -> list[dict[str, Any]]:
    """The samples the job's trainer continued after training (trainer_core/samples.py); none when it wrote
    none (a job that did not finish, --sample_count 0) or the file is not readable."""
    try:
        text = client.download_artifact(job_id, SAMPLES_FILE).decode("utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ApiError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("branches"), list)]


def samples_html(records: list[dict[str, Any]]) -> str:
    """Each sample as a table: a row per branch with its start, what the model wrote after it and what the
    data has there (all text escaped: a sample is the user's data)."""
    esc = lambda value: html.escape("" if value is None else str(value))  # noqa: E731
    parts = []
    for record in records:
        source = "validation" if record.get("source") == "validation" else "training"
        main = str(record.get("main") or "")
        shown_main = main if len(main) <= SAMPLE_MAIN_CHARS else "…" + main[-SAMPLE_MAIN_CHARS:]
        rows = "".join(
            f"<tr><td>{k}</td><td>{esc(b.get('start'))}</td><td><b>{esc(b.get('generated'))}</b></td>"
            f"<td>{esc(b.get('data'))}</td></tr>"
            for k, b in enumerate(record["branches"], start=1) if isinstance(b, dict))
        parts.append(f'<div class="job-sample"><p><b>Sample {esc(record.get("sample"))} of the {source} set</b> '
                     f'(after step {esc(record.get("step"))}). Main: {esc(shown_main) or "(none)"}</p>'
                     '<table><thead><tr><th>branch</th><th>start (given)</th><th>the model wrote</th>'
                     f'<th>the data has</th></tr></thead><tbody>{rows}</tbody></table></div>')
    return "".join(parts)


def samples_updates(records: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """(the accordion, its content): hidden without samples."""
    return gr.update(visible=bool(records)), samples_html(records)


def job_summary(job: dict[str, Any], waits: str | None = None, best: tuple[int, float] | None = None,
                val_step: int | None = None) -> str:
    """The job's Markdown summary; `best`: (step, loss) of its adapter_best/ (ApiClient.best_adapter); `val_step`: the
    step of its last validation loss (last_validation_step)."""
    cfg = job.get("config", {})
    lines = [f"### Job #{job['id']} · {job.get('name') or cfg.get('name', '')} · {STATE_ICONS.get(job['state'], '')} "
             f"{job['state']}{' (cancel requested)' if job.get('cancel_requested') and job['state'] == 'running' else ''}",
             # what is known so far: a queued job has no progress, ETA or speed to show (a row of '-' read badly)
             " · ".join(f"**{name}** {value}" for name, value in (
                 ("progress", progress_text(job)), ("ETA", eta_text(job)),
                 ("tokens/s", fmt_number(job.get("tokens_per_s"))), ("GPU", gpu_text(job)),
                 ("attempt", f"{job.get('attempt', 1)}/{job.get('max_attempts') or '?'}")) if value),
             f"model {cfg.get('base_model', '')} · data {cfg.get('data_path', '')}" + validation_text(cfg)
             + (f" · LoRA from `{cfg['init_adapter']}`" if cfg.get("init_adapter") else "")]
    if cfg.get("output_dir"):   # where adapter/ is, for `paratrain generate --adapter` on the server's machine
        lines.append(f"**outputs** `{cfg['output_dir']}`")
    if job.get("last_val_loss") is not None:
        at = f" at step {val_step}" if val_step is not None else ""
        lowest = "" if not best else (f" (lowest {best[1]:.4f} at step 0, before training: `adapter_best/` is the "
                                      "adapter it started from)" if best[0] == 0 else
                                      f" (lowest {best[1]:.4f} at step {best[0]}: `adapter_best/`)")
        lines.append(f"**validation loss** {fmt_number(job['last_val_loss'], 4)}{at}{lowest} · **training loss** "
                     f"{fmt_number(job.get('last_loss'), 4) or '-'}")
    if stopped_early(job):
        lines.append(f"**Stopped early** at step {job['step']} of {job['total_steps']}: "
                     f"{cfg['early_stop_patience']} validations in a row without {improvement_text(cfg)} "
                     f"(`adapter/` is step {job['step']}'s, `adapter_best/` the lowest's).")
    when = when_text(job)
    if when:
        lines.append(when)
    if job.get("retry_of"):
        lines.append(f"retry of job #{job['retry_of']}: resumes from its last checkpoint, if it saved one")
    if job.get("retried_as"):
        lines.append(f"retried as job #{job['retried_as']}")
    if waits:
        lines.append(f"**waits** {waits}")
    if job["state"] == "cancelled":
        reason = job.get("failure_reason") or "cancelled"
        lines.append(f"**{reason[0].upper()}{reason[1:]}.**")
    elif job.get("failure_reason") or job.get("failure_class"):
        failure = failure_kind(job)
        lines.append(f"**Failed: {FAILURE_ADVICE.get(failure, failure)}.**" if failure else "**Failed.**")
        if job.get("failure_reason"):
            lines.append(code_block(failure_text(job["failure_reason"])))
    return "\n\n".join(lines)


def failure_text(reason: str, tail_lines: int = FAILURE_TAIL_LINES) -> str:
    """The failure reason, its non-empty lines; a long one as its first line, a marker and its last lines."""
    kept = [line.rstrip() for line in reason.splitlines() if line.strip()]
    if len(kept) <= tail_lines + 1:
        return "\n".join(kept)
    hidden = len(kept) - 1 - tail_lines
    return "\n".join([kept[0], f"… ({hidden} lines not shown)", *kept[-tail_lines:]])


def code_block(text: str) -> str:
    """`text` verbatim in Markdown: a traceback's `<frozen runpy>` would otherwise be taken for an HTML tag
    and everything after it dropped. The fence is longer than any backtick run inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def job_actions(job: dict[str, Any] | None) -> tuple[bool, bool, bool]:
    """Whether Cancel, Retry and Download adapter can do anything for the job: cancel a job that has not
    ended (and is not being cancelled), retry one that failed or was cancelled and not yet retried (the
    server retries a job once), download the adapter a job writes when it succeeds, or the best one it
    kept before it was stopped (a validation loss was measured: stopping once it turns up is why one
    cancels)."""
    state = (job or {}).get("state")
    can_cancel = state == "queued" or (state == "running" and not job.get("cancel_requested"))
    ended = state in ("failed", "cancelled")
    can_download = state == "succeeded" or (ended and job.get("last_val_loss") is not None)
    return can_cancel, ended and not job.get("retried_as"), can_download


def action_updates(job: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Cancel, Retry and Download enabled as `job_actions` says, Edit as new job for any job, and Train on from
    adapter for a job with an adapter to download (all off when no job is selected)."""
    can_cancel, can_retry, has_adapter = job_actions(job)
    return [gr.update(interactive=enabled) for enabled in (can_cancel, can_retry, has_adapter, job is not None,
                                                           has_adapter)]


def train_on_values(job: dict[str, Any], best: tuple[int, float] | None) -> tuple[dict[str, Any], str]:
    """Form values of a new job that starts from `job`'s adapter (init_adapter): its settings, which the
    adapter needs, and the adapter of its lowest validation loss (`best`: ApiClient.best_adapter's step and loss) when
    training lowered it, else its final one; and what that adapter is, for the user."""
    values = job_values(job)
    if best is not None and (best[0] > 0 or job["state"] != "succeeded"):
        which = f"{BEST_ADAPTER_DIR}/ (step {best[0]}, validation loss {best[1]:.4f}" + (
            ": before training, the adapter it started from)" if best[0] == 0 else ")")
        values["init_adapter"] = str(Path(job["config"]["output_dir"]) / BEST_ADAPTER_DIR)
    else:   # no validation, or none lower than before training: the adapter of its last step
        which = f"adapter/ (its last step, {job.get('step')})"
        values["init_adapter"] = str(Path(job["config"]["output_dir"]) / "adapter")
    return values, which


def settings_yaml(job: dict[str, Any]) -> str:
    """The job's settings as *Save as YAML* writes them (what `paratrain submit` takes), without what the
    server set for it (its output dir)."""
    try:
        values = job_values(job)
    except ValueError as e:   # a config of an older schema: shown as stored
        return f"# not loadable in this version's form: {e}\n" + yaml.safe_dump(job.get("config", {}), sort_keys=False)
    return to_yaml({k: v for k, v in values.items() if k not in JOB_SET_FIELDS})


def _selected_id(value: Any) -> int:
    job_id = parse_job_id(value)
    if job_id is None:
        raise KeyError("no job is selected")
    return job_id


def parse_job_id(value: Any) -> int | None:
    """The picker's value: a job id (int), or text like "#12 name" / "12" typed by the user."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(value)
    digits = "".join(ch for ch in str(value).lstrip("# ").split(" ")[0] if ch.isdigit())
    return int(digits) if digits else None


def picker_update(client: ApiClient, job_id: int | None = None) -> dict[str, Any]:
    """Fresh choices for the job picker, selecting `job_id` (it may be newer than the last refresh)."""
    try:
        choices = [(job_label(j), j["id"]) for j in client.list_jobs(limit=100)]
    except ApiError:
        return gr.update(value=job_id) if job_id is not None else gr.update()
    return gr.update(choices=choices, value=job_id) if job_id is not None else gr.update(choices=choices)


def curve_frame(points: list[dict[str, Any]], y: str) -> pd.DataFrame:
    rows = [(p["step"], p[y]) for p in points if p.get(y) is not None]
    # explicit dtypes: an empty or object column would make the chart's axis categorical
    return pd.DataFrame(rows, columns=["step", y]).astype({"step": "int64", y: "float64"})


ADAPTER_DIRS = ("adapter/", f"{BEST_ADAPTER_DIR}/")   # what *Download adapter* zips, of a job's outputs

# The loss plot's two curves: the training loss of each logged step, the validation loss where it was evaluated
LOSS_CURVES = {"loss": "training", "val_loss": "validation"}
LOSS_COLOURS = {"training": "#4f46e5", "validation": "#e11d48"}
LOSS_PLOT_HEIGHT = 240
LR_PLOT_HEIGHT = 150


def loss_frame(points: list[dict[str, Any]]) -> pd.DataFrame:
    """Both loss curves in one frame (a `curve` column tells them apart)."""
    rows = [(p["step"], p[key], curve) for key, curve in LOSS_CURVES.items() for p in points if p.get(key) is not None]
    return pd.DataFrame(rows, columns=["step", "loss", "curve"]).astype({"step": "int64", "loss": "float64",
                                                                         "curve": "string"})


def curve_title(points: list[dict[str, Any]], y: str, name: str) -> str:
    """'Loss (step 8: 2.778)': the last value, in the chart's title."""
    last = last_point(points, y)
    return f"{name} (step {last['step']}: {last[y]:.4g})" if last else name


def loss_title(points: list[dict[str, Any]]) -> str:
    """curve_title of the training loss, and the last validation loss when there is one:
    'Loss (step 8: 2.778; validation at step 5: 2.9)'."""
    title = curve_title(points, "loss", "Loss")
    last = last_point(points, "val_loss")
    if last is None:
        return title
    val = f"validation at step {last['step']}: {last['val_loss']:.4g}"
    return f"{title[:-1]}; {val})" if title.endswith(")") else f"{title} ({val})"


def loss_chart(points: list[dict[str, Any]]) -> PlotData:
    """Both loss curves, the validation loss with a dot at each measurement (the first, at step 0, is a dot
    alone), titled and on the step axis of the learning-rate plot."""
    return curve_chart(loss_frame(points), y="loss", series="curve", colours=LOSS_COLOURS, title=loss_title(points),
                       height=LOSS_PLOT_HEIGHT, x_domain=step_axis(points), dotted=["validation"])


def lr_chart(points: list[dict[str, Any]]) -> PlotData:
    """The learning rate of each logged step, on the loss chart's step axis."""
    frame = curve_frame(points, "lr").assign(curve="learning rate")
    return curve_chart(frame, y="lr", series="curve", colours={"learning rate": LOSS_COLOURS["training"]},
                       title=curve_title(points, "lr", "Learning rate"), height=LR_PLOT_HEIGHT,
                       x_domain=step_axis(points), legend=False)


SHORT_CURVE_STEPS = 10


def step_axis(points: list[dict[str, Any]]) -> list[int]:
    """The step axis: from the first step (0 when the curve starts with the validation loss before training,
    else 1) to the last, at least SHORT_CURVE_STEPS steps: over 1..3 the plot puts ticks at halves, and the
    whole-step format labels them '1 2 2 3 3'. Always a range: `x_lim=None` does not undo an earlier one (a
    job opened after a short curve was drawn on steps 1..10 whatever its length)."""
    last = points[-1]["step"] if points else 0
    first = min(1, points[0]["step"]) if points else 1
    return [first, max(last, SHORT_CURVE_STEPS)]


def empty_watch() -> dict[str, Any]:
    # last_step -1: the first fetch takes step 0 too (a validation loss before training)
    return {"job_id": None, "points": [], "last_step": -1, "log_offset": 0, "log_lines": [], "final": False,
            "best": None}


def fetch_new(client: ApiClient, watch: dict[str, Any]) -> tuple[bool, bool]:
    """Append metrics and log lines newer than what `watch` holds; (new points?, new log lines?)."""
    job_id = watch["job_id"]
    metrics = client.metrics(job_id, since_step=watch["last_step"])
    if metrics:
        by_step = {p["step"]: p for p in watch["points"]}
        by_step.update({p["step"]: p for p in metrics})  # a resumed job re-logging a step replaces it
        watch["points"] = [by_step[s] for s in sorted(by_step)]
        watch["last_step"] = watch["points"][-1]["step"]
        if any(p.get("val_loss") is not None for p in metrics):   # adapter_best/ may have changed with it
            watch["best"] = client.best_adapter(job_id)
    new_lines = False
    for _ in range(50):  # catch up on a long log a page at a time, bounded per tick
        page = client.logs(job_id, offset=watch["log_offset"], limit=1000)
        lines = [row["line"] for row in page.get("data", [])]
        if not lines:
            break
        new_lines = True
        watch["log_lines"] = (watch["log_lines"] + lines)[-LOG_TAIL_LINES:]
        next_offset = page.get("next_offset")
        watch["log_offset"] = next_offset if next_offset is not None else watch["log_offset"] + len(lines)
        if len(lines) < 1000:
            break
    return bool(metrics), new_lines


def log_html(lines: list[str]) -> str:
    """The log tail in a box that stays scrolled to its newest line (column-reverse keeps the bottom in view)."""
    shown = readable_lines(lines)
    text = html.escape("\n".join(shown)) if shown else "(no log lines yet)"
    return ('<div style="font-size:13px;font-weight:600;margin-bottom:4px">Log tail</div>'
            '<div class="log-tail" style="max-height:230px;overflow:auto;display:flex;flex-direction:column-reverse;'
            'border:1px solid var(--border-color-primary);border-radius:6px;padding:6px">'
            f'<pre style="margin:0;white-space:pre-wrap;font-size:12px">{text}</pre></div>')


def curve_text(watch: dict[str, Any]) -> str:
    n = sum(p.get("loss") is not None for p in watch["points"])   # training steps (step 0 has a validation loss only)
    return f"Loss curve: {n} point{'s' if n != 1 else ''}" + (f", last step {watch['last_step']}" if n else "")


def no_adapter_file() -> dict:
    """Hidden and empty: a failed download must not leave an earlier job's zip there for SAVE_FILE_JS to save."""
    return gr.update(value=None, visible=False)


def create_jobs_tab(ctx: UiContext) -> JobsTab:
    table_ids = gr.State([])
    watch = gr.State(empty_watch())
    table = gr.Dataframe(headers=TABLE_COLUMNS, interactive=False, wrap=True, max_height=TABLE_HEIGHT_PX,
                         label="Jobs (newest first; click a row to open it)", elem_id="jobs-table")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=380):
            picker = gr.Dropdown(choices=[], value=None, label="Selected job", elem_id="job-picker")
            summary = gr.Markdown(PICK_HINT, elem_id="job-summary")
            with gr.Row():
                cancel_button = gr.Button("Cancel", variant="stop", size="sm", interactive=False, elem_id="cancel-job")
                retry_button = gr.Button("Retry", size="sm", interactive=False, elem_id="retry-job")
                download_button = gr.Button("Download adapter", size="sm", interactive=False,
                                            elem_id="download-adapter")
                edit_button = gr.Button("Edit as new job", size="sm", interactive=False, elem_id="edit-job")
                train_on_button = gr.Button("Train on from adapter", size="sm", interactive=False,
                                            elem_id="train-on")
            adapter_file = gr.File(label="Adapter", visible=False, interactive=False, elem_id="adapter-file")
            with gr.Accordion("Settings", open=False, elem_id="job-settings-box"):
                settings = gr.Code(language="yaml", interactive=False, show_label=False, elem_id="job-settings")
            log_tail = gr.HTML(label="Log tail", elem_id="log-tail")
        with gr.Column(scale=3, min_width=420):
            curve_info = gr.Markdown(elem_id="curve-info")
            loss_plot = gr.Plot(loss_chart([]), show_label=False, elem_id="loss-plot", elem_classes="curve-chart")
            lr_plot = gr.Plot(lr_chart([]), show_label=False, elem_id="lr-plot", elem_classes="curve-chart")
    # what the trained model writes, greedy from each branch's first tokens (trainer_core/samples.py)
    with gr.Accordion("Samples after training", open=True, visible=False, elem_id="job-samples-box") as samples_box:
        gr.Markdown("What the trained model writes after each branch's first tokens (greedy), beside what the data "
                    "has there. A small or briefly trained model writes noise or repeats itself; the tiny demo "
                    "model always does.")
        samples = gr.HTML(elem_id="job-samples")
    refresh_timer = gr.Timer(2.0)
    poll_timer = gr.Timer(1.0)
    # The job each page (session) selected last. Polls run unqueued, beside a new selection's load: a poll
    # begun for the old job may answer after it and would put the old job back on the page, Cancel included.
    selected_by_page: dict[str, int | None] = {}

    def refresh(session):
        if not (session or {}).get("token"):
            return gr.skip(), gr.skip(), gr.skip()
        try:
            jobs = ctx.client(session).list_jobs(limit=100)
        except ApiError:
            return gr.skip(), gr.skip(), gr.skip()
        return table_rows(jobs), [j["id"] for j in jobs], gr.update(choices=[(job_label(j), j["id"]) for j in jobs])

    def select(session, job_id, request: gr.Request):
        """A new selection: fetch everything from step 0 (also what a reloaded page does)."""
        fresh = empty_watch()
        job_id = parse_job_id(job_id)
        selected_by_page.pop(request.session_hash, None)   # re-inserted last: the oldest pages go first
        selected_by_page[request.session_hash] = job_id
        while len(selected_by_page) > MAX_PAGES_REMEMBERED:
            selected_by_page.pop(next(iter(selected_by_page)))
        if job_id is None or not (session or {}).get("token"):
            return (fresh, PICK_HINT, "", loss_chart([]), lr_chart([]), "", *samples_updates([]), no_adapter_file(),
                    "", *action_updates(None))
        fresh["job_id"] = job_id
        try:
            client = ctx.client(session)
            job = client.get_job(fresh["job_id"])
            fetch_new(client, fresh)
        except ApiError as e:
            return (fresh, f"Cannot load job #{job_id}: {e}", "", gr.skip(), gr.skip(), "", *samples_updates([]),
                    no_adapter_file(), "", *action_updates(None))
        return (fresh, job_summary(job, wait_reason(client, job), fresh["best"], last_validation_step(fresh["points"])),
                curve_text(fresh),
                loss_chart(fresh["points"]),
                lr_chart(fresh["points"]), log_html(fresh["log_lines"]),
                *samples_updates(job_samples(client, job_id) if job["state"] == "succeeded" else []),
                no_adapter_file(), settings_yaml(job), *action_updates(job))

    def poll(session, current, selected, request: gr.Request):
        skip = (gr.skip(),) * len(view + actions)
        if not current or current.get("job_id") is None or not (session or {}).get("token"):
            return skip

        def superseded() -> bool:   # another job was selected since (or while) this poll ran
            latest = selected_by_page.get(request.session_hash, current["job_id"])
            return parse_job_id(selected) != current["job_id"] or latest != current["job_id"]

        if superseded():
            return skip
        if current.get("final"):  # everything of a finished job is shown: stop asking
            return skip
        try:
            client = ctx.client(session)
            job = client.get_job(current["job_id"])
            new_points, new_lines = fetch_new(client, current)  # after get_job: a final job's last points too
        except ApiError:
            return skip
        if superseded():
            return skip
        current["final"] = job["state"] in FINAL_STATES
        ended = job["state"] == "succeeded"   # this poll is the last: a final job is not polled again
        return (current, job_summary(job, wait_reason(client, job), current.get("best"),
                                     last_validation_step(current["points"])),
                curve_text(current) if new_points else gr.skip(),
                loss_chart(current["points"]) if new_points else gr.skip(),
                lr_chart(current["points"]) if new_points else gr.skip(),
                log_html(current["log_lines"]) if new_lines else gr.skip(),
                *(samples_updates(job_samples(client, job["id"])) if ended else (gr.skip(), gr.skip())),
                *action_updates(job))

    def pick_row(ids, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return ids[row] if ids and row is not None and row < len(ids) else gr.skip()

    # The actions take the picker's job, what the page shows as selected, not the watch state a late poll
    # may still hold.
    def cancel(session, selected):
        try:
            job = ctx.client(session).cancel_job(_selected_id(selected))
        except (ApiError, TypeError, KeyError) as e:
            warn(f"Cancel failed: {e}")
            return (gr.skip(),) * (1 + len(actions))
        gr.Info(f"Job #{job['id']}: cancel {'requested' if job['state'] == 'running' else 'done'}.")
        return job_summary(job), *action_updates(job)

    def retry(session, selected):
        try:
            job = ctx.client(session).retry_job(_selected_id(selected))
        except (ApiError, TypeError, KeyError) as e:
            warn(f"Retry failed: {e}")
            return gr.skip()
        gr.Info(f"Job #{job['id']} queued as a retry of #{job['retry_of']}.")
        return picker_update(ctx.client(session), job["id"])

    def download(session, selected):
        try:
            client = ctx.client(session)
            job_id = _selected_id(selected)
            # the final adapter, and the one of the lowest validation loss when the job had a validation set
            files = [a["path"] for a in client.artifacts(job_id) if a["path"].startswith(ADAPTER_DIRS)]
            if not files:
                raise ApiError(404, f"job #{job_id} has no adapter (adapter/ is written when training ends, "
                                    f"{BEST_ADAPTER_DIR}/ at a validation)")
            target = scratch_file(f"job{job_id}-adapter.zip")
            with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
                for path in files:
                    z.writestr(path, client.download_artifact(job_id, path))
        except (ApiError, TypeError, KeyError) as e:
            warn(f"Download failed: {e}")
            return no_adapter_file()
        return gr.update(value=target, visible=True)

    actions = [cancel_button, retry_button, download_button, edit_button, train_on_button]
    view = [watch, summary, curve_info, loss_plot, lr_plot, log_tail, samples_box, samples]
    refresh_timer.tick(refresh, ctx.session, [table, table_ids, picker], queue=False, show_progress="hidden")
    poll_timer.tick(poll, [ctx.session, watch, picker], view + actions, queue=False, show_progress="hidden")
    picker.change(select, [ctx.session, picker], view + [adapter_file, settings] + actions, show_progress="hidden")
    table.select(pick_row, table_ids, picker, queue=False)
    cancel_button.click(cancel, [ctx.session, picker], [summary] + actions)
    retry_button.click(retry, [ctx.session, picker], picker)
    # one click: the zip, once built, is saved as a link's click would (the file box stays as a second way)
    download_button.click(download, [ctx.session, picker], adapter_file) \
        .then(None, adapter_file, None, js=SAVE_FILE_JS)
    return JobsTab(table, table_ids, picker, refresh_timer, poll_timer, summary, curve_info, loss_plot, lr_plot,
                   log_tail, cancel_button, retry_button, download_button, edit_button, train_on_button, settings,
                   adapter_file, samples_box, samples, watch, refresh)
