"""Compare tab: the training or validation loss curves of several jobs overlaid (GET /api/jobs/{id}/metrics
for each)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from trainer_core.config import TrainConfig
from ui.api import ApiError
from ui.charts import PlotData, curve_chart
from ui.context import UiContext
from ui.jobtext import fmt_number, progress_text


PALETTE = ["#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#65a30d", "#db2777"]
CURVES = {"loss": "Training loss", "val_loss": "Validation loss"}
# Against tokens or time, jobs with other batch sizes or speeds compare: {X_AXES column: the choice's label}
AGAINST = {"step": "Step", "tokens_seen": "Tokens seen", "train_min": "Training time"}
SECONDS_AXIS_BELOW_MIN = 2.0   # training time in seconds while every curve ends within this many minutes


@dataclass
class CompareTab:
    picker: gr.Dropdown
    curve: gr.Radio
    against: gr.Radio
    refresh_button: gr.Button
    plot: gr.Plot   # a Vega-Lite chart (ui/charts.py)
    info: gr.Markdown
    table: gr.Dataframe   # how each job ended, and the settings in which they differ


COMPARE_HINT = "Pick jobs above: their loss curves are drawn on one plot, a colour each."
PLOT_HEIGHT = 420


def compare_chart(frame: pd.DataFrame, curve: str, against: str = "step") -> PlotData:
    """The jobs' curves (frame columns `against`, loss, job), a colour each (in the order picked); validation
    losses have a dot at each measurement (a job that measured it once has a dot alone)."""
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys(frame["job"]))}
    n = len(colours)
    return curve_chart(frame, y="loss", series="job", colours=colours, height=PLOT_HEIGHT, x=against,
                       title=f"{CURVES.get(curve, 'Loss')} of {n} job{'s' if n != 1 else ''}",
                       dotted=colours if curve == "val_loss" else ())


# What decides the samples a validation loss averages: its file, or the share held out of the data (and the
# seed choosing it); and how samples are cut from records
SAMPLE_FIELDS = ("max_seq_len", "branches_per_sample", "min_branches_per_sample", "max_branches_per_sample")


def x_value(point: dict, against: str) -> float | None:
    """Where a metric point lies on the X_AXES column `against` (None: not recorded, by a trainer from before
    tokens and time were counted)."""
    if against == "train_min":
        return None if point.get("train_s") is None else point["train_s"] / 60
    return point.get(against)


# Settings that say where and how often a run writes, not what it learns: never a column of the results table
NOT_COMPARED = frozenset({"output_dir", "name", "resume", "log_interval", "save_interval"})
PATH_FIELDS = frozenset({"base_model", "data_path", "val_data_path", "init_adapter"})


def short_path(path: str) -> str:
    """A path's last two parts ('…/datasets/demo.jsonl'): whole server paths made the table wider than the page."""
    parts = Path(path).relative_to(Path(path).anchor).parts
    return path if len(parts) <= 2 else "…/" + "/".join(parts[-2:])


def run_speed(points: list[dict]) -> float | None:
    """Tokens per second over the whole run (all its attempts' training loops), from its last point that counts
    both; a single step's speed (the job's tokens_per_s) swung 3x between steps of one run."""
    last = next((p for p in reversed(points) if p.get("tokens_seen") and p.get("train_s")), None)
    return last["tokens_seen"] / last["train_s"] if last else None


def results_table(jobs: list[tuple[str, dict, list[dict]]]) -> pd.DataFrame:
    """A row per (label, job, its metric points): how it ended (progress, lowest validation loss and its step,
    last training loss, tokens/s over the run, peak memory) and each setting in which the jobs differ, a column
    each (a sweep's `--set`s, found rather than remembered)."""
    fields = TrainConfig.model_fields

    def setting(job: dict, key: str):
        return job["gpus"] if key == "gpus" else job["config"].get(key, fields[key].default)

    def shown(key: str, value) -> str:
        return "" if value is None else short_path(str(value)) if key in PATH_FIELDS else str(value)

    keys = [k for k in [*fields, "gpus"] if k not in NOT_COMPARED]
    differing = [k for k in keys if len({repr(setting(job, k)) for _, job, _ in jobs}) > 1]
    rows = []
    for label, job, points in jobs:
        measured = [(p["val_loss"], p["step"]) for p in points if p.get("val_loss") is not None]
        lowest = min(measured) if measured else None
        rows.append({"job": label, "state": job["state"], "progress": progress_text(job),
                     "lowest val loss": f"{lowest[0]:.4f} (step {lowest[1]})" if lowest else "",
                     "last loss": fmt_number(job.get("last_loss"), 4), "run tokens/s": fmt_number(run_speed(points)),
                     "peak GB": fmt_number(job.get("peak_mem_gb"), 1),
                     **{k: shown(k, setting(job, k)) for k in differing}})
    # "run tokens/s": the whole run's average (the Jobs table's is the last step's)
    return pd.DataFrame(rows, columns=["job", "state", "progress", "lowest val loss", "last loss", "run tokens/s",
                                       "peak GB", *differing])


def validation_set_key(cfg: dict) -> dict:
    """What decides a job's validation samples: where they come from, in words ('10% of …/demo.jsonl held out
    (seed 42)', 'the file …/val.jsonl'), and how samples are cut."""
    def get(key: str):
        return cfg.get(key, TrainConfig.model_fields[key].default)

    source = (f"the file {short_path(get('val_data_path'))}" if get("val_data_path") else
              f"{get('val_ratio') * 100:.3g}% of {short_path(get('data_path'))} held out (seed {get('seed')})")
    return {"validation set": source, **{k: get(k) for k in SAMPLE_FIELDS}}


def validation_set_differences(configs: dict[str, dict]) -> list[str]:
    """How the validation samples of these jobs ({label: config}) differ, a setting each: 'val_ratio 0.1 for #2,
    #3; 0.2 for #4' ([]: the same samples, as far as the settings tell). Their losses then do not compare one to
    one."""
    keys = {label: validation_set_key(cfg) for label, cfg in configs.items()}
    fields = dict.fromkeys(field for key in keys.values() for field in key)
    differences = []
    for field in fields:
        labels_by_value: dict[str, list[str]] = {}
        for label, key in keys.items():
            labels_by_value.setdefault("none" if key.get(field) is None else str(key[field]), []).append(label)
        if len(labels_by_value) > 1:
            differences.append(f"{field} " + "; ".join(f"{value} for {', '.join(labels)}"
                                                       for value, labels in labels_by_value.items()))
    return differences


def create_compare_tab(ctx: UiContext) -> CompareTab:
    with gr.Row():
        picker = gr.Dropdown(choices=[], value=[], multiselect=True, label="Jobs to compare", scale=4,
                             elem_id="compare-picker")
        refresh_button = gr.Button("Refresh curves", size="sm", scale=1, elem_id="compare-refresh")
    with gr.Row():
        curve = gr.Radio([(title, key) for key, title in CURVES.items()], value="loss", label="Curve",
                         info="The validation loss is there for jobs with val_ratio or val_data_path.",
                         elem_id="compare-curve")
        against = gr.Radio([(label, key) for key, label in AGAINST.items()], value="step", label="Against",
                           info="Tokens seen and training time compare jobs of other batch sizes or speeds.",
                           elem_id="compare-against")
    plot = gr.Plot(show_label=False, elem_id="compare-plot", elem_classes="curve-chart")
    info = gr.Markdown(COMPARE_HINT, elem_id="compare-info")
    table = gr.Dataframe(results_table([]), label="How they ended, and the settings in which they differ",
                         interactive=False, elem_id="compare-table")   # wrap=True broke headers letter by letter

    def compare(session, job_ids, curve, against):
        rows, notes, validated, picked = [], [], {}, []
        try:
            client = ctx.client(session)
            for job_id in job_ids or []:
                job = client.get_job(int(job_id))
                points = client.metrics(int(job_id))
                label = f"#{job['id']} {job.get('name') or job['config'].get('name', '')}"
                picked.append((label, job, points))
                measured = [p for p in points if p.get(curve) is not None]
                drawn = [(x_value(p, against), p[curve], label) for p in measured if x_value(p, against) is not None]
                rows += drawn
                if drawn and curve == "val_loss":
                    validated[f"#{job['id']}"] = job["config"]
                unplaced = (f" ({len(measured) - len(drawn)} without {AGAINST[against].lower()}: trained by an "
                            "older paratrain)" if len(drawn) < len(measured) else "")
                notes.append(f"{label}: {len(drawn)} points, {job['state']}" + unplaced
                             + (" (no validation set)" if curve == "val_loss" and not measured and points else ""))
        except ApiError as e:
            return gr.skip(), f"Cannot compare: {e}", gr.skip()
        if against == "train_min" and rows and max(x for x, _, _ in rows) < SECONDS_AXIS_BELOW_MIN:
            against, rows = "train_s", [(x * 60, loss, job) for x, loss, job in rows]   # not 0.02-minute ticks
        frame = pd.DataFrame(rows, columns=[against, "loss", "job"]).astype(
            {against: "int64" if against == "step" else "float64", "loss": "float64", "job": "string"})
        info = " · ".join(notes) or COMPARE_HINT
        differ = validation_set_differences(validated)
        if differ:   # a paragraph of its own: easy to miss at the end of the line above
            info += ("\n\n**⚠ These validation losses average different samples**, so they do not compare one to "
                     "one: " + " · ".join(f"`{d}`" for d in differ))
        return compare_chart(frame, curve, against), info, results_table(picked)

    def choices(session):
        try:
            jobs = ctx.client(session).list_jobs(limit=100)
        except ApiError:
            return gr.skip()
        return gr.update(choices=[(f"#{j['id']} {j.get('name') or j['config'].get('name', '')} ({j['state']})",
                                   j["id"]) for j in jobs])

    picker.focus(choices, ctx.session, picker, queue=False, show_progress="hidden")  # the list is current when opened
    for trigger in (picker.change, curve.change, against.change, refresh_button.click):
        trigger(compare, [ctx.session, picker, curve, against], [plot, info, table], show_progress="hidden")
    return CompareTab(picker, curve, against, refresh_button, plot, info, table)
