"""New job tab: the TrainConfig form (grouped as the guide groups its flags), GPU count, command preview
(POST /api/command-preview), submit (POST /api/jobs), save/load YAML, and the VRAM panel beside it."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass

import gradio as gr

from trainer_core.demo import DEMO_DATA, DEMO_MODEL, demo_job
from ui.api import ApiError
from ui.context import SAVE_FILE_JS, UiContext, scratch_file, warn
from ui.form import ConfigForm, build_config_form, from_yaml, job_body, to_yaml, validate
from ui.tabs.memory import MemoryPanel, create_memory_panel
from ui.workers import capacity_warning, known_workers

# short: the whole example must fit the narrow input; the field's help says it is required
PLACEHOLDERS = {"base_model": f"e.g. {DEMO_MODEL}", "data_path": f"e.g. {DEMO_DATA}"}


@dataclass
class SubmitTab:
    form: ConfigForm
    memory: MemoryPanel
    preview_button: gr.Button
    command: gr.Code
    submit_button: gr.Button
    status: gr.Markdown
    save_button: gr.Button
    load_button: gr.UploadButton
    saved_file: gr.File
    submitted_job_id: gr.Number  # the id of the last job submitted in this session (hidden)


def format_command(argv: list[str]) -> str:
    """The argv as one shell command, a flag and its value per line (as the guide writes its commands)."""
    lines, current = [], []
    for arg in argv:
        if arg.startswith("--") and current:
            lines.append(shlex.join(current))
            current = []
        current.append(arg)
    if current:
        lines.append(shlex.join(current))
    return " \\\n  ".join(lines)


def create_submit_tab(ctx: UiContext) -> SubmitTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=480):
            form = build_config_form(placeholders=PLACEHOLDERS)
        with gr.Column(scale=2, min_width=360):
            memory = create_memory_panel(ctx, form)
            gr.Markdown("#### Launch")
            with gr.Row():
                preview_button = gr.Button("Preview command", size="sm", elem_id="preview-command")
                submit_button = gr.Button("Submit job", variant="primary", elem_id="submit-job")
            # beside Submit, not under a form two screens tall: a saved job is what `paratrain submit` queues
            with gr.Row():
                load_button = gr.UploadButton("Load YAML", file_types=[".yaml", ".yml", ".json"], size="sm",
                                              elem_id="load-yaml")
                save_button = gr.Button("Save as YAML", size="sm", elem_id="save-yaml")
                demo_button = gr.Button("Demo job", size="sm", elem_id="demo-job")
            saved_file = gr.File(label="Saved config", visible=False, interactive=False, elem_id="saved-yaml")
            status = gr.Markdown(elem_id="submit-status")
            command = gr.Code(label="torchrun command (as the worker runs it)", language="shell",
                              interactive=False, elem_id="command-preview")
            submitted_job_id = gr.Number(visible=False, precision=0)

    def preview(session, *form_args):
        """(command, status): a refusal goes to the status line, where it wraps, not into the code box."""
        values = form.values(form_args)
        config, error = validate(values, with_job=True)
        if config is None:
            return "", f"✖ Fix the form first: {error}"
        try:
            argv = ctx.client(session).command_preview(job_body(values, config))
        except ApiError as e:
            return "", f"✖ No preview: {e}"
        return format_command(argv), ""

    def submit(session, *form_args):
        values = form.values(form_args)
        config, error = validate(values, with_job=True)
        if config is None:
            return f"✖ Fix the form first: {error}", gr.skip()
        try:
            client = ctx.client(session)
            job = client.submit_job(job_body(values, config))
        except ApiError as e:
            return f"✖ Not submitted: {e}", gr.skip()
        message = f"✔ Job #{job['id']} ({job.get('name') or config.name}) is {job['state']}."
        workers = known_workers(client)
        # submitted all the same: the workers it needs may join later
        warning = capacity_warning(workers, job["gpus"], job["nodes"]) if workers is not None else None
        return (f"{message}\n\n⚠ {warning}" if warning else message), job["id"]

    def save(*form_args):
        values = form.values(form_args)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", str(values.get("name") or "paratrain"))
        path = scratch_file(f"{name}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(to_yaml(values))
        return gr.update(value=path, visible=True)

    def load(file):
        path = file if isinstance(file, str) else getattr(file, "name", None)
        try:
            with open(path, encoding="utf-8") as f:
                values = from_yaml(f.read())
        except (OSError, ValueError, TypeError) as e:
            warn(f"Cannot load {os.path.basename(str(path))}: {e}")
            return form.updates({})
        gr.Info(f"Loaded {os.path.basename(path)}.")
        return form.updates(values)

    def fill_in_demo():
        """The demo job's settings (serve's demo model and data, a learning rate that shows the loss falling
        within a minute on a CPU, a validation set): the form's defaults are a real run's, which on the tiny
        random model train for minutes without a visible change."""
        gr.Info("The demo job is in the form: submit it as it is, or change it first.")
        return form.updates(from_yaml(json.dumps(demo_job())))

    preview_button.click(preview, [ctx.session, *form.inputs], [command, status])
    demo_button.click(fill_in_demo, None, form.inputs)
    submit_button.click(submit, [ctx.session, *form.inputs], [status, submitted_job_id])
    # queued (not queue=False): only queued events deliver gr.Info/gr.Warning toasts, and a file they
    # return gets a download link under the UI's mount path
    save_button.click(save, form.inputs, saved_file).then(None, saved_file, None, js=SAVE_FILE_JS)   # one click
    load_button.upload(load, load_button, form.inputs)
    return SubmitTab(form, memory, preview_button, command, submit_button, status, save_button, load_button,
                     saved_file, submitted_job_id)
