"""Compare tab: the training or validation loss curves of several jobs overlaid (GET /api/jobs/{id}/metrics
for each)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ui.api import ApiError
from ui.context import UiContext


PALETTE = ["#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#65a30d", "#db2777"]
CURVES = {"loss": "Training loss", "val_loss": "Validation loss"}


@dataclass
class CompareTab:
    picker: gr.Dropdown
    curve: gr.Radio
    refresh_button: gr.Button
    plot: gr.LinePlot
    info: gr.Markdown


COMPARE_HINT = "Pick jobs above: their loss curves are drawn on one plot, a colour each."


def create_compare_tab(ctx: UiContext) -> CompareTab:
    with gr.Row():
        picker = gr.Dropdown(choices=[], value=[], multiselect=True, label="Jobs to compare", scale=4,
                             elem_id="compare-picker")
        refresh_button = gr.Button("Refresh curves", size="sm", scale=1, elem_id="compare-refresh")
    curve = gr.Radio([(title, key) for key, title in CURVES.items()], value="loss", label="Curve",
                     info="The validation loss is there for jobs with val_ratio or val_data_path.",
                     elem_id="compare-curve")
    plot = gr.LinePlot(x="step", y="loss", color="job", title="Loss", height=420, x_axis_format="d",
                       elem_id="compare-plot")
    info = gr.Markdown(COMPARE_HINT, elem_id="compare-info")

    def compare(session, job_ids, curve):
        rows, notes = [], []
        try:
            client = ctx.client(session)
            for job_id in job_ids or []:
                job = client.get_job(int(job_id))
                points = client.metrics(int(job_id))
                label = f"#{job['id']} {job.get('name') or job['config'].get('name', '')}"
                drawn = [(p["step"], p[curve], label) for p in points if p.get(curve) is not None]
                rows += drawn
                notes.append(f"{label}: {len(drawn)} points, {job['state']}"
                             + (" (no validation set)" if curve == "val_loss" and not drawn and points else ""))
        except ApiError as e:
            return gr.skip(), f"Cannot compare: {e}", gr.skip()
        frame = pd.DataFrame(rows, columns=["step", "loss", "job"]).astype({"step": "int64", "loss": "float64",
                                                                             "job": "string"})
        return frame, " · ".join(notes) or COMPARE_HINT, list(dict.fromkeys(frame["job"]))

    def restyle(labels, curve):
        """Gradio draws a plot's colours and legend anew only when a setting changes, not its data: without a
        new color_map and title, a job added after the first was left out of the picture. This runs after
        the data is in place (in the same update, the new drawing would use the old data)."""
        colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels or [])}
        n = len(colours)
        return gr.update(color_map=colours, title=f"{CURVES.get(curve, 'Loss')} of {n} job{'s' if n != 1 else ''}")

    def choices(session):
        try:
            jobs = ctx.client(session).list_jobs(limit=100)
        except ApiError:
            return gr.skip()
        return gr.update(choices=[(f"#{j['id']} {j.get('name') or j['config'].get('name', '')} ({j['state']})",
                                   j["id"]) for j in jobs])

    picker.focus(choices, ctx.session, picker, queue=False, show_progress="hidden")  # the list is current when opened
    labels = gr.State([])
    for trigger in (picker.change, curve.change, refresh_button.click):
        trigger(compare, [ctx.session, picker, curve], [plot, info, labels], show_progress="hidden") \
            .then(restyle, [labels, curve], plot, queue=False, show_progress="hidden")
    return CompareTab(picker, curve, refresh_button, plot, info)
