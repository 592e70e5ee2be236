"""Compare tab: the loss curves of several jobs overlaid (GET /api/jobs/{id}/metrics for each)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ui.api import ApiError
from ui.context import UiContext


@dataclass
class CompareTab:
    picker: gr.Dropdown
    refresh_button: gr.Button
    plot: gr.LinePlot
    info: gr.Markdown


def create_compare_tab(ctx: UiContext) -> CompareTab:
    with gr.Row():
        picker = gr.Dropdown(choices=[], value=[], multiselect=True, label="Jobs to compare", scale=4,
                             elem_id="compare-picker")
        refresh_button = gr.Button("Refresh curves", size="sm", scale=1, elem_id="compare-refresh")
    plot = gr.LinePlot(x="step", y="loss", color="job", title="Loss", height=420, elem_id="compare-plot")
    info = gr.Markdown(elem_id="compare-info")

    def compare(session, job_ids):
        rows, notes = [], []
        try:
            client = ctx.client(session)
            for job_id in job_ids or []:
                job = client.get_job(int(job_id))
                points = client.metrics(int(job_id), since_step=0)
                label = f"#{job['id']} {job.get('name') or job['config'].get('name', '')}"
                rows += [(p["step"], p["loss"], label) for p in points if p.get("loss") is not None]
                notes.append(f"{label}: {len(points)} points, {job['state']}")
        except ApiError as e:
            return gr.skip(), f"Cannot compare: {e}"
        frame = pd.DataFrame(rows, columns=["step", "loss", "job"]).astype({"step": "int64", "loss": "float64",
                                                                             "job": "string"})
        return frame, " · ".join(notes)

    def choices(session):
        try:
            jobs = ctx.client(session).list_jobs(limit=100)
        except ApiError:
            return gr.skip()
        return gr.update(choices=[(f"#{j['id']} {j.get('name') or j['config'].get('name', '')} ({j['state']})",
                                   j["id"]) for j in jobs])

    picker.focus(choices, ctx.session, picker, queue=False, show_progress="hidden")  # the list is current when opened
    picker.change(compare, [ctx.session, picker], [plot, info], show_progress="hidden")
    refresh_button.click(compare, [ctx.session, picker], [plot, info])
    return CompareTab(picker, refresh_button, plot, info)
