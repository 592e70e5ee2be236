"""Dataset tab: the server's data check (POST /api/datasets/check) for the form's data_path and model
before anything is submitted — errors with FILE:LINE, branch-count histogram, token lengths, padding share
after packing — and a picture of one sample's columnar layout (branches as rows, time as columns)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from trainer_core import vram
from trainer_core.config import SAMPLE_SHAPING_FIELDS, TrainConfig
from trainer_core.demo import DEMO_DATA, DEMO_MODEL
from ui.api import ApiError
from ui.context import UiContext
from ui.form import ConfigForm, config_dict

# Row colours of the layout picture: the main branch, then the branches in turn.
MAIN_COLOUR = "#4b5563"
BRANCH_COLOURS = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2", "#dc2626", "#ca8a04", "#db2777"]
MAX_PICTURE_COLUMNS = 256  # wider samples are cropped (the picture says so)
MAX_PICTURE_ROWS = 32
MAX_HISTOGRAM_BARS = 100  # branch counts spread wider than this are drawn without the zero bars between


@dataclass
class DatasetTab:
    check_button: gr.Button
    summary: gr.Markdown
    errors: gr.Textbox
    histogram: gr.BarPlot
    layout: gr.HTML


def check_body(values: dict[str, Any]) -> dict[str, Any]:
    """The check's request: data_path, base_model (its tokenizer), the form's fields that shape samples and
    val_data_path (its lines are checked too)."""
    config = config_dict(values)
    return {k: v for k, v in config.items()
            if k in (*SAMPLE_SHAPING_FIELDS, "data_path", "base_model", "val_data_path") and v not in (None, "")}


def _flat(values: Any) -> list:
    """[[...]] (a batch of one) or [...] -> [...]."""
    if isinstance(values, list) and values and isinstance(values[0], list):
        return [v for row in values for v in row]
    return list(values or [])


def layout_cells(layout: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(time step, row) of each token of an example layout (data_cli.example_layout)."""
    return [int(t) for t in _flat(layout.get("time_ids"))], [int(b) for b in _flat(layout.get("branch_index"))]


def column_slots(times: list[int], limit: int) -> tuple[dict[int, int], list[tuple[int, int, int]]]:
    """Where each time step is drawn: {time step: slot}, at most `limit` slots, and the gaps as
    (slot, first step left out, last step left out).

    An example may hold windows of its sample (the main's first steps, then the branches' first steps,
    which begin after the whole main): the steps between are not drawn, one '⋯' slot stands for them, so
    the branches are in the picture however long the main is."""
    slots: dict[int, int] = {}
    gaps: list[tuple[int, int, int]] = []
    slot, previous = 0, None
    for t in sorted(set(times)):
        if previous is not None and t > previous + 1:
            if slot + 1 >= limit:
                break
            gaps.append((slot, previous + 1, t - 1))
            slot += 1
        if slot >= limit:
            break
        slots[t] = slot
        slot, previous = slot + 1, t
    return slots, gaps


def row_name(row: int, has_main: bool) -> str:
    return "main" if has_main and row == 0 else f"branch {row if has_main else row + 1}"


def layout_notes(times: list[int], rows: list[int], slots: dict[int, int], shown_rows: int, has_main: bool,
                 total_cols: int) -> list[str]:
    """What the picture leaves out, in words."""
    notes = []
    if total_cols > len(slots):
        notes.append(f"{len(slots)} of {total_cols} time steps shown")
    n_rows = max(rows) + 1
    if n_rows > shown_rows:
        notes.append(f"first {shown_rows} of {n_rows} rows shown")
    if has_main and n_rows == 1 and total_cols > max(times) + 1:
        notes.append(f"the example the server sent holds only the first {max(times) + 1} time steps, all of them "
                     "the main's: the branches start after the main's last token, beyond it")
    return notes


def tokens_caption(shown: int, total: int | None) -> str:
    """The sample's token count; the server sends only the first time steps of a long sample."""
    return f"{shown} of {total} tokens shown" if total and total > shown else f"{shown} tokens"


def layout_svg(layout: dict[str, Any] | None) -> str:
    """One sample as a grid: a row per branch (main first), a column per time step; a filled cell is a token.

    Accepts the example_layout of the check summary (see `layout_cells`); `has_main` says whether row 0
    is the main, `columns_total` how many time steps the whole sample has."""
    if not layout:
        return "<p>No example sample.</p>"
    times, rows = layout_cells(layout)
    if not times or len(times) != len(rows):
        return "<p>The example sample has no layout to draw.</p>"
    has_main = bool(layout.get("has_main", layout.get("main_len", 0)))
    tokens = [str(t) for t in layout.get("tokens") or []]
    total_cols = max(int(layout.get("columns_total") or 0), max(times) + 1)
    slots, gaps = column_slots(times, MAX_PICTURE_COLUMNS)
    n_rows = max(rows) + 1
    shown_rows, shown_cols = min(n_rows, MAX_PICTURE_ROWS), max(slots.values()) + 1
    cell_w = max(2.0, min(14.0, 900.0 / shown_cols))
    cell_h = 14.0 if shown_rows <= 16 else 9.0
    label_w, top = 70, 30
    width, height = label_w + shown_cols * cell_w + 4, top + shown_rows * cell_h + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'role="img" aria-label="columnar layout">',
             f'<text x="{label_w}" y="12" font-size="11" fill="currentColor">time →  '
             f'({tokens_caption(len(times), layout.get("tokens_total"))}, {n_rows} rows, {total_cols} time steps)'
             '</text>']
    # the first time step of each run of drawn steps, above its column
    for t, slot in slots.items():
        if t == 0 or t - 1 not in slots:
            parts.append(f'<text x="{label_w + slot * cell_w:.1f}" y="26" font-size="9" fill="currentColor">{t}</text>')
    for slot, first, last in gaps:
        parts.append(f'<text x="{label_w + slot * cell_w:.1f}" y="{top + shown_rows * cell_h / 2 + 4:.1f}" font-size="10" '
                     f'fill="currentColor"><title>time steps {first}–{last} not shown</title>⋯</text>')
    for r in range(shown_rows):
        parts.append(f'<text x="0" y="{top + r * cell_h + cell_h - 3:.1f}" font-size="10" '
                     f'fill="currentColor">{html.escape(row_name(r, has_main))}</text>')
    for i, (t, r) in enumerate(zip(times, rows)):
        if r >= shown_rows or t not in slots:
            continue
        colour = MAIN_COLOUR if has_main and r == 0 else BRANCH_COLOURS[r % len(BRANCH_COLOURS)]
        tip = f"<title>time {t}: {html.escape(repr(tokens[i]))}</title>" if i < len(tokens) else ""
        parts.append(f'<rect x="{label_w + slots[t] * cell_w:.1f}" y="{top + r * cell_h:.1f}" '
                     f'width="{max(cell_w - 1, 1):.1f}" height="{cell_h - 2:.1f}" fill="{colour}">{tip}</rect>')
    parts.append("</svg>")
    notes = layout_notes(times, rows, slots, shown_rows, has_main, total_cols)
    if gaps:
        notes.append("⋯ stands for time steps left out")
    caption = ("Every branch starts at the column after the main; a token attends to all earlier columns of "
               "every branch of its sample, never to another branch's token in its own column.")
    note = f" ({'; '.join(notes)})" if notes else ""
    return (f'<div class="layout-picture" style="overflow-x:auto">{"".join(parts)}'
            f'<p style="font-size:12px">{caption}{note}</p></div>')


def checked_text(body: dict[str, Any]) -> str:
    """What was checked, as the New job form set it: '`datasets/demo.jsonl`, tokenized by `models/tiny-qwen2`
    (max_seq_len 1024, 1-16 texts per sample)'."""
    max_seq_len = body.get("max_seq_len", TrainConfig.model_fields["max_seq_len"].default)
    return (f"`{body.get('data_path')}`, tokenized by `{body.get('base_model')}` (max_seq_len {max_seq_len}, "
            f"{vram.branches_text(body)} texts per sample); from the New job form")


def summary_markdown(s: dict[str, Any], body: dict[str, Any] | None = None) -> str:
    pct = s.get("token_length_percentiles") or {}
    errors = s.get("errors") or []
    head = "✖ The data has errors: a job with it would not start." if errors else "✔ The data is valid."
    rows = [("records", s.get("records")), ("samples", s.get("samples")),
            ("samples held out for validation (val_ratio)", s.get("validation_samples") or None),
            ("records of val_data_path", s.get("validation_records")),
            ("tokens after packing", s.get("tokens_after_packing")),
            ("padding share after packing", f"{s['padding_share']:.1%}" if s.get("padding_share") is not None else None),
            ("text length p50 / p90 / p99 / max (tokens)",
             " / ".join(str(pct.get(k, "?")) for k in ("p50", "p90", "p99", "max")) if pct else None)]
    lines = [f"### {head}", ""] + ([checked_text(body), ""] if body else [])
    lines += [f"⚠ {w}" + "  " for w in s.get("warnings") or []]   # two spaces: a Markdown line break
    shown = [(k, v) for k, v in rows if v is not None]
    if shown:   # a file that could not be read has errors only: no empty table
        lines += ["", "| measure | value |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |" for k, v in shown]
    return "\n".join(lines)


def histogram_frame(s: dict[str, Any]) -> pd.DataFrame:
    """Samples per branch count, in numeric order, counts between the smallest and largest that no sample
    has included as 0 (a gap in the data shows as a gap in the bars).

    The counts are strings, so that each is one bar (a numeric x would be a continuous axis); the JSON
    keys are strings anyway, which sort as text (10 before 2) unless the plot is given the order:
    `histogram_update` does that."""
    hist = {int(k): int(v) for k, v in (s.get("branches_histogram") or {}).items()}
    counts = range(min(hist), max(hist) + 1) if hist and max(hist) - min(hist) < MAX_HISTOGRAM_BARS else sorted(hist)
    frame = pd.DataFrame({"branches": [str(k) for k in counts], "samples": [hist.get(k, 0) for k in counts]})
    return frame.astype({"branches": "string", "samples": "int64"})


def histogram_update(s: dict[str, Any]) -> dict[str, Any]:
    """The histogram with its x axis in the frame's (numeric) order."""
    frame = histogram_frame(s)
    return gr.update(value=frame, sort=list(frame["branches"]), visible=True)


def create_dataset_tab(ctx: UiContext, form: ConfigForm, tokens_per_text: gr.Textbox | None = None) -> DatasetTab:
    gr.Markdown("Checks the form's `data_path` with the form's `base_model` tokenizer and data settings "
                "(the **New job** tab), exactly as the trainer will read it.")
    check_button = gr.Button("Check dataset", variant="primary", elem_id="check-dataset")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            summary = gr.Markdown(elem_id="dataset-summary")
            errors = gr.Textbox(label="Errors (FILE:LINE)", lines=6, max_lines=12, visible=False,
                                elem_id="dataset-errors")
        with gr.Column(scale=1, min_width=320):
            histogram = gr.BarPlot(x="branches", y="samples", title="Branches per sample", height=240,
                                   elem_id="branches-histogram")
    layout_heading = gr.Markdown("#### One sample's columnar layout (rows: branches, columns: time)", visible=False)
    layout = gr.HTML(elem_id="layout-picture")

    # an earlier check's pictures are not left beside a failed check's message, where they would pass for its
    # (histogram, layout, tokens_per_text, layout heading)
    cleared = (gr.update(visible=False), "", gr.skip(), gr.update(visible=False))

    def check(session, *form_args):
        body = check_body(form.values(form_args))
        if not body.get("data_path") or not body.get("base_model"):
            return (f"Enter `data_path` and `base_model` in the New job tab first (the demo: `{DEMO_DATA}` and "
                    f"`{DEMO_MODEL}`).", gr.update(visible=False), *cleared)
        try:
            s = ctx.client(session).check_dataset(body)
        except ApiError as e:
            return f"✖ Check failed: {e}", gr.update(visible=False), *cleared
        errors_text = "\n".join(str(e) for e in s.get("errors") or [])
        if s.get("records") is None:  # only errors: the file could not be read as Parallel JSONL
            return (summary_markdown(s, body), gr.update(value=errors_text, visible=True), *cleared)
        p90 = (s.get("token_length_percentiles") or {}).get("p90")
        has_histogram = bool(s.get("branches_histogram"))
        return (summary_markdown(s, body), gr.update(value=errors_text, visible=bool(errors_text)),
                histogram_update(s) if has_histogram else gr.update(visible=False),
                layout_svg(s.get("example_layout")), str(int(p90)) if p90 else gr.skip(),
                gr.update(visible=bool(s.get("example_layout"))))

    outputs = [summary, errors, histogram, layout, tokens_per_text if tokens_per_text is not None else gr.State(),
               layout_heading]
    check_button.click(check, [ctx.session, *form.inputs], outputs)
    return DatasetTab(check_button, summary, errors, histogram, layout)
