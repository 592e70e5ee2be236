"""VRAM panel of the New job tab: presets for a GPU size and model (GET /api/presets) and the peak-memory
estimate of the current form (POST /api/estimate), corrected by the peaks of jobs that already ran on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from trainer_core import vram
from ui.api import ApiClient, ApiError
from ui.context import UiContext, warn
from ui.form import ConfigForm, validate
from ui.workers import gpu_worker_online, known_workers, largest_gpu_gb

FORM_MODEL = "base_model of the form"
SIZES = ["0.5B", "1.5B", "3B", "7B"]
DEFAULT_GPU_MEM_GB = 80.0
GPU_MEM_INFO = "Default: the largest GPU the workers report."
# The presets table shows the presets side by side, a column each, with the settings as rows: three
# columns fit beside the form, where a column per setting (eleven) squeezed the headers letter by letter
# and pushed peak and fits off-screen. The verdict rows come first.
VERDICT_ROWS = ("peak GB", "fits")


@dataclass
class MemoryPanel:
    gpu_mem: gr.Number
    model: gr.Dropdown
    tokens_per_text: gr.Textbox
    presets_button: gr.Button
    presets_table: gr.Dataframe
    preset_choice: gr.Radio
    apply_button: gr.Button
    estimate_button: gr.Button
    estimate_md: gr.Markdown
    presets_state: gr.State


def gpu_mem_update(workers: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The GPU size field after login: the largest GPU the workers report, else the default, saying so."""
    size = largest_gpu_gb(workers or [])
    if size is not None:
        return gr.update(value=size, info=GPU_MEM_INFO)
    why = "No worker reports a GPU" if workers else "No worker is registered"
    return gr.update(value=DEFAULT_GPU_MEM_GB, info=f"{why}: enter your GPU's memory ({DEFAULT_GPU_MEM_GB:g} GB until "
                                                    "you do).")


def measured_peaks(client: ApiClient) -> list[dict[str, Any]]:
    """Jobs that ran on a GPU and recorded their peak: what the estimate is corrected with."""
    return [{"config": j["config"], "peak_mem_gb": j["peak_mem_gb"]} for j in client.list_jobs(limit=200)
            if j.get("peak_mem_gb") and (j.get("gpus") or 0) > 0]


def presets_frame(plist: list[dict[str, Any]]) -> pd.DataFrame:
    """The presets as columns (headed by their names), vram.PRESET_COLUMNS' settings as rows."""
    settings = list(vram.PRESET_COLUMNS[1:])
    order = [c for c in VERDICT_ROWS if c in settings] + [c for c in settings if c not in VERDICT_ROWS]
    table: dict[str, list[str]] = {"setting": order}
    for row in vram.preset_rows(plist):
        by_setting = dict(zip(vram.PRESET_COLUMNS, row))
        table[str(by_setting["preset"])] = [str(by_setting[name]) for name in order]
    return pd.DataFrame(table)


def gpu_mem_gib(value: Any) -> float:
    """The GPU memory input as GiB; ValueError naming the input (an emptied one, 0 or -10 must not
    estimate for another size than the one shown)."""
    gib = vram.gpu_size_gib(value)
    if gib is None:
        raise ValueError(f"GPU memory: {value!r} is no GPU size; enter its GiB, e.g. 80 for an H100")
    return gib


def tokens_per_text_value(text: Any) -> int | None:
    """The 'typical tokens per text' input: None when empty (max_seq_len, the worst case); ValueError naming
    the input for anything but a positive whole number."""
    if text is None or not str(text).strip():
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        value = 0
    if value < 1 or not value.is_integer():
        raise ValueError(f"typical tokens per text: {str(text).strip()!r} is not a positive whole number "
                         "(empty: max_seq_len)")
    return int(value)


def estimate_headline(est: dict[str, Any], gpu_worker_online: bool = True) -> list[str]:
    """The verdict; without a GPU worker online the estimate is for a GPU that may never come, and says so
    rather than a plain "fits"."""
    peak, size = est["peak_gb"], est["gpu_mem_gb"]
    if not gpu_worker_online:
        verdict = "would fit" if est["fits"] else "would **not** fit"
        return [f"### ℹ Estimated peak {peak:.1f} GB: {verdict} a GPU of {size:g} GB",
                f"**No GPU worker online**: this is the estimate for a GPU of {size:g} GB (*GPU memory* above). "
                "A CPU job (`gpus` 0) does not use GPU memory."]
    share = peak / size if size else 0
    verdict = "fits" if est["fits"] else "**does not fit**"
    icon = "✔" if est["fits"] and not est["warnings"] else ("⚠" if est["fits"] else "✖")
    return [f"### {icon} Estimated peak {peak:.1f} GB of {size:g} GB ({share:.0%}): {verdict}"]


def estimate_markdown(est: dict[str, Any], gpu_worker_online: bool = True) -> str:
    parts = est["breakdown_gb"]
    lines = estimate_headline(est, gpu_worker_online)
    lines += ["", "| part | GB |", "|---|---:|"]
    labels = {"weights": "model weights", "lora_state": "LoRA + grads + AdamW", "activations": "activations",
              "logits": "logits (loss chunk)", "overhead": "CUDA context + allocator slack"}
    lines += [f"| {labels.get(k, k)} | {v:.2f} |" for k, v in parts.items()]
    model = est.get("model", {})
    lines += ["", f"{model.get('name', '')} ({vram.param_count(model.get('params'))} params, "
                  f"from {model.get('source', '?')}); "
              f"{est['tokens_per_micro_batch']:,} tokens per micro-batch "
              f"({est['tokens_per_text']} per text)."]
    corr = est.get("correction")
    if corr:
        lines.append(f"Corrected by measured peaks of {corr['jobs']} job(s) ({corr['basis']}): x{corr['factor']} on "
                     f"activations + logits (uncorrected {est['raw_peak_gb']:.1f} GB).")
    else:
        lines.append("No measured GPU job yet: calibrated on the H100 measurements (docs/VRAM.md).")
    if est["warnings"]:
        lines += [""] + [f"- ⚠ {w}" for w in est["warnings"]]
    return "\n".join(lines)


def create_memory_panel(ctx: UiContext, form: ConfigForm) -> MemoryPanel:
    gr.Markdown("#### GPU memory")
    with gr.Row():
        # no `minimum`: Gradio's own refusal is a toast that names no input, and the estimate stayed as it was
        gpu_mem = gr.Number(value=DEFAULT_GPU_MEM_GB, label="GPU memory (GB)", elem_id="gpu-mem", info=GPU_MEM_INFO)
        model = gr.Dropdown(choices=[FORM_MODEL] + SIZES, value=FORM_MODEL, label="Model for presets",
                            allow_custom_value=True, elem_id="preset-model")
    tokens_per_text = gr.Textbox(value="", label="typical tokens per text", max_lines=1,
                                 placeholder="empty: max_seq_len (worst case)",
                                 info="The dataset check fills in its p90 length.", elem_id="tokens-per-text")
    with gr.Row():
        presets_button = gr.Button("Get presets", elem_id="get-presets", size="sm")
        estimate_button = gr.Button("Estimate memory", elem_id="estimate", size="sm")
    presets_table = gr.Dataframe(headers=["setting"], interactive=False, wrap=True, visible=False,
                                 elem_id="presets-table")
    with gr.Row():
        preset_choice = gr.Radio(choices=[], label="Preset", visible=False, elem_id="preset-choice")
        apply_button = gr.Button("Apply preset", variant="primary", visible=False, elem_id="apply-preset", size="sm")
    estimate_md = gr.Markdown(elem_id="estimate-md")
    presets_state = gr.State([])

    def get_presets(session, gpu_mem_gb, model_choice, *form_args):
        try:
            client = ctx.client(session)
            target = model_choice
            if not target or target == FORM_MODEL:
                target = (form.values(form_args).get("base_model") or "").strip()
                if not target:
                    raise ApiError(422, "Enter base_model in the form, or pick a model size.")
            gib = gpu_mem_gib(gpu_mem_gb)
            plist = client.presets(gib, target)
        except (ApiError, ValueError) as e:
            warn(str(e))
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        names = [p["name"] for p in plist]
        # the presets are for the model picked above, which may not be the form's: the caption says which
        caption = f"Presets for {target} on a {gib:g} GB GPU"
        return (plist, gr.update(value=presets_frame(plist), visible=True, label=caption, show_label=True),
                gr.update(choices=names, value=names[0] if names else None, visible=True), gr.update(visible=True))

    presets_button.click(get_presets, [ctx.session, gpu_mem, model, *form.inputs],
                         [presets_state, presets_table, preset_choice, apply_button])

    def apply_preset(plist, choice):
        chosen = next((p for p in plist if p["name"] == choice), None)
        if chosen is None:
            gr.Warning("Pick a preset first.")
            return form.updates({})
        gr.Info(f"Applied preset '{choice}'.")
        return form.updates(dict(chosen["config"]))   # every field of its table row

    def run_estimate(session, gpu_mem_gb, tokens, *form_args):
        config, error = validate(form.values(form_args))
        if config is None:
            return f"Cannot estimate: {error}"
        try:
            gib, typical = gpu_mem_gib(gpu_mem_gb), tokens_per_text_value(tokens)
            client = ctx.client(session)
            est = client.estimate(config.model_dump(mode="json"), gib, measured_peaks(client), typical)
        except (ApiError, ValueError) as e:
            return f"Cannot estimate: {e}"
        workers = known_workers(client)
        return estimate_markdown(est, gpu_worker_online=workers is None or gpu_worker_online(workers))

    def auto_estimate(session, gpu_mem_gb, tokens, *form_args):
        """The estimate follows the form: re-run on every change, quietly while the form is incomplete."""
        values = form.values(form_args)
        if not (session or {}).get("token") or not values.get("base_model") or not values.get("data_path"):
            return gr.skip()
        if validate(values)[0] is None:
            return "*The estimate waits for a valid form.*"
        return run_estimate(session, gpu_mem_gb, tokens, *form_args)

    estimate_inputs = [ctx.session, gpu_mem, tokens_per_text, *form.inputs]
    apply_button.click(apply_preset, [presets_state, preset_choice], form.inputs)   # queued: its toast shows
    estimate_button.click(run_estimate, estimate_inputs, estimate_md)
    # always_last: a burst of changes (a preset, a loaded YAML) costs one estimate, of the final form
    gr.on([c.change for c in (gpu_mem, tokens_per_text, *form.inputs)], auto_estimate, estimate_inputs, estimate_md,
          trigger_mode="always_last", show_progress="hidden")
    return MemoryPanel(gpu_mem, model, tokens_per_text, presets_button, presets_table, preset_choice,
                       apply_button, estimate_button, estimate_md, presets_state)

