"""Compare tab: the training or validation loss curves of several jobs overlaid (GET /api/jobs/{id}/metrics
for each)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from trainer_core.config import TrainConfig
from ui.api import ApiError
from ui.charts import PlotData, curve_chart
from ui.context import UiContext


PALETTE = ["#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#65a30d", "#db2777"]
CURVES = {"loss": "Training loss", "val_loss": "Validation loss"}


@dataclass
class CompareTab:
    picker: gr.Dropdown
    curve: gr.Radio
    refresh_button: gr.Button
    plot: gr.Plot   # a Vega-Lite chart (ui/charts.py)
    info: gr.Markdown


COMPARE_HINT = "Pick jobs above: their loss curves are drawn on one plot, a colour each."
PLOT_HEIGHT = 420


def compare_chart(frame: pd.DataFrame, curve: str) -> PlotData:
    """The jobs' curves, a colour each (in the order picked); validation losses have a dot at each measurement
    (a job that measured it once has a dot alone)."""
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys(frame["job"]))}
    n = len(colours)
    return curve_chart(frame, y="loss", series="job", colours=colours, height=PLOT_HEIGHT,
                       title=f"{CURVES.get(curve, 'Loss')} of {n} job{'s' if n != 1 else ''}",
                       dotted=colours if curve == "val_loss" else ())


# What decides the samples a validation loss averages: its file, or the share held out of the data (and the
# seed choosing it); and how samples are cut from records
SAMPLE_FIELDS = ("max_seq_len", "branches_per_sample", "min_branches_per_sample", "max_branches_per_sample")


def validation_set_key(cfg: dict) -> dict:
    source = ("val_data_path",) if cfg.get("val_data_path") else ("data_path", "val_ratio", "seed")
    return {k: cfg.get(k, TrainConfig.model_fields[k].default) for k in (*source, *SAMPLE_FIELDS)}


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
    curve = gr.Radio([(title, key) for key, title in CURVES.items()], value="loss", label="Curve",
                     info="The validation loss is there for jobs with val_ratio or val_data_path.",
                     elem_id="compare-curve")
    plot = gr.Plot(show_label=False, elem_id="compare-plot", elem_classes="curve-chart")
    info = gr.Markdown(COMPARE_HINT, elem_id="compare-info")

    def compare(session, job_ids, curve):
        rows, notes, validated = [], [], {}
        try:
            client = ctx.client(session)
            for job_id in job_ids or []:
                job = client.get_job(int(job_id))
                points = client.metrics(int(job_id))
                label = f"#{job['id']} {job.get('name') or job['config'].get('name', '')}"
                drawn = [(p["step"], p[curve], label) for p in points if p.get(curve) is not None]
                rows += drawn
                if drawn and curve == "val_loss":
                    validated[f"#{job['id']}"] = job["config"]
                notes.append(f"{label}: {len(drawn)} points, {job['state']}"
                             + (" (no validation set)" if curve == "val_loss" and not drawn and points else ""))
        except ApiError as e:
            return gr.skip(), f"Cannot compare: {e}"
        frame = pd.DataFrame(rows, columns=["step", "loss", "job"]).astype({"step": "int64", "loss": "float64",
                                                                             "job": "string"})
        info = " · ".join(notes) or COMPARE_HINT
        differ = validation_set_differences(validated)
        if differ:   # a paragraph of its own: easy to miss at the end of the line above
            info += ("\n\n**⚠ These validation losses average different samples**, so they do not compare one to "
                     "one: " + " · ".join(f"`{d}`" for d in differ))
        return compare_chart(frame, curve), info

    def choices(session):
        try:
            jobs = ctx.client(session).list_jobs(limit=100)
        except ApiError:
            return gr.skip()
        return gr.update(choices=[(f"#{j['id']} {j.get('name') or j['config'].get('name', '')} ({j['state']})",
                                   j["id"]) for j in jobs])

    picker.focus(choices, ctx.session, picker, queue=False, show_progress="hidden")  # the list is current when opened
    for trigger in (picker.change, curve.change, refresh_button.click):
        trigger(compare, [ctx.session, picker, curve], [plot, info], show_progress="hidden")
    return CompareTab(picker, curve, refresh_button, plot, info)
