"""The job form, derived from `trainer_core.config.TrainConfig` and `JobResources`: one input per field, in
the field's group, with its default and help. Nothing here names a parameter, so a new field of either
appears in the form by itself.

The schema is read from the class (it imports no torch and holds no state); everything that acts on a
config — preview, submit, estimate — goes through the REST API.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import yaml
from pydantic import BaseModel, ValidationError

from trainer_core.config import (GROUPS, JOB_SET_FIELDS, JobResources, TrainConfig, format_validation_error,
                                 parse_job_file)

GROUP_TITLES = {"model": "Model", "data": "Data", "validation": "Validation", "training": "Training",
                "output": "Output"}
JOB_FIELDS = tuple(JobResources.model_fields)   # the job-level fields of JobCreate (docs/API.md)
FORM_COLUMNS = 3  # fits a laptop screen: the whole form in about two screen heights


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def component_for(name: str, info: Any, placeholder: str | None = None,
                  elem_prefix: str = "cfg") -> gr.components.Component:
    """The input for one schema field: label = flag name, info = the field's help, value = default;
    `placeholder` replaces a text input's own ("required", "empty: not set")."""
    kind, optional = _base_type(info.annotation)
    default = None if info.is_required() else info.default
    help_text = info.description or ""
    if optional:
        help_text += " (optional: leave empty)"
    elif info.is_required():
        help_text += " (required)"
    common = {"label": name, "info": help_text, "elem_id": f"{elem_prefix}-{name}"}
    if elem_prefix == "cfg" and name in JOB_SET_FIELDS:   # shown, not editable: the server decides it
        common.update(info=f"{help_text} ({JOB_SET_FIELDS[name]})", interactive=False)
    if optional and kind in (int, float):
        # gr.Number cannot be empty (it shows and sends 0), so an unset number is an empty textbox
        return gr.Textbox(value="" if default is None else str(default),
                          placeholder=placeholder or "empty: not set", max_lines=1, **common)
    if kind is bool:
        return gr.Checkbox(value=bool(default), **common)
    if typing.get_origin(kind) is typing.Literal:
        return gr.Dropdown(choices=list(typing.get_args(kind)), value=default, **common)
    # No minimum/maximum on gr.Number: Gradio would refuse an out-of-range value itself, with a toast that
    # names no field; `validate` names it ("batch_size: Input should be greater than or equal to 1").
    # No precision=0 for an int either: Gradio would round 2.5 to 2 before `validate` sees it, and run a
    # setting the form does not show; a whole float becomes an int in schema_kwargs, 2.5 is refused by name.
    if kind is float:
        return gr.Number(value=default, step=float_step(default), **common)
    if kind is int:
        return gr.Number(value=default, **common)
    placeholder = placeholder or ("required" if info.is_required() else None)
    return gr.Textbox(value=default or "", placeholder=placeholder, max_lines=1, **common)


def float_step(default: float | None) -> float:
    """The spinner step of a float input: a tenth of its default's order of magnitude (1e-4 moves by 1e-5,
    0.5 by 0.01), so that the arrows nudge a value instead of adding 1 to a learning rate."""
    if not default:
        return 0.01
    return 10.0 ** (math.floor(math.log10(abs(default))) - 1)


@dataclass
class ConfigForm:
    """The form's inputs: TrainConfig fields by name, plus the job-level JobResources fields."""

    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    job: dict[str, gr.components.Component] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.fields) + list(self.job)

    @property
    def inputs(self) -> list[gr.components.Component]:
        return list(self.fields.values()) + list(self.job.values())

    def values(self, args: tuple | list) -> dict[str, Any]:
        """Callback arguments (in `inputs` order) -> {name: value}."""
        return dict(zip(self.names, args))

    def updates(self, values: dict[str, Any]) -> list[Any]:
        """Outputs for `inputs`: the new value where `values` names the field, else unchanged."""
        return [gr.update(value=values[n]) if n in values else gr.skip() for n in self.names]


def build_config_form(open_groups: tuple[str, ...] = ("model", "data", "validation", "training"),
                      placeholders: dict[str, str] | None = None) -> ConfigForm:
    """Render the grouped inputs in the current Blocks context; `placeholders` by field name (text inputs)."""
    placeholders = placeholders or {}
    form = ConfigForm()
    by_group = TrainConfig.fields_by_group()
    for group in GROUPS:
        names = by_group.get(group, [])
        if not names:
            continue
        with gr.Accordion(GROUP_TITLES.get(group, group.title()), open=group in open_groups,
                          elem_id=f"group-{group}"):
            form.fields.update(_grid(names, lambda name: component_for(name, TrainConfig.model_fields[name],
                                                                       placeholders.get(name)),
                                     wide={n for n in names if is_path_field(TrainConfig.model_fields[n])}))
    with gr.Accordion("Resources", open=True, elem_id="group-resources"):
        form.job.update(_grid(JOB_FIELDS, lambda name: component_for(name, JobResources.model_fields[name],
                                                                     elem_prefix="job")))
    return form


def _grid(names: typing.Sequence[str], make: typing.Callable[[str], gr.components.Component],
          wide: typing.Collection[str] = ()) -> dict[str, Any]:
    """Inputs made by `make`: the `wide` ones (paths, cut short in a column) first, a row each, then the
    others filled into FORM_COLUMNS columns row by row."""
    made = {}
    for name in (name for name in names if name in wide):
        with gr.Row():
            made[name] = make(name)
    with gr.Row(equal_height=False):
        columns = [gr.Column(min_width=200) for _ in range(FORM_COLUMNS)]
    for i, name in enumerate(name for name in names if name not in wide):
        with columns[i % FORM_COLUMNS]:
            made[name] = make(name)
    return {name: made[name] for name in names}   # the schema's order, as callbacks and saved files see it


def is_path_field(info: Any) -> bool:
    """A file or directory field (TrainConfig's `is_path`)."""
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("format") == "path"


# --- values <-> config ------------------------------------------------------------------------------
def config_dict(values: dict[str, Any]) -> dict[str, Any]:
    """Form values -> TrainConfig keyword arguments (see schema_kwargs)."""
    return schema_kwargs(TrainConfig, values)


def schema_kwargs(schema: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """Form values -> keyword arguments of `schema`: empty optional inputs are left out (so the schema's
    default applies), whole floats from gr.Number become ints where the field is an int."""
    out: dict[str, Any] = {}
    for name, info in schema.model_fields.items():
        if name not in values:
            continue
        value = values[name]
        if _is_empty(value):
            continue
        kind, _ = _base_type(info.annotation)
        if isinstance(value, str):
            value = value.strip()
            if kind in (int, float):
                value = _parse_number(value, kind)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        out[name] = value
    return out


def _is_empty(value: Any) -> bool:
    """An input left empty: a cleared gr.Number (None) or a blank textbox."""
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_number(text: str, kind: type) -> Any:
    """'16' -> 16, '1e-4' -> 0.0001; text that is no number is passed on for pydantic to name the field."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if kind is int and number.is_integer() else number


def emptied(schema: type[BaseModel], values: dict[str, Any]) -> list[str]:
    """'field: ...' for each input of a field with a default that was emptied: schema_kwargs leaves it out, and
    the default would run while the form shows nothing."""
    return [f"{name}: empty; enter a value (the default is {info.default})"
            for name, info in schema.model_fields.items()
            if name in values and name not in JOB_SET_FIELDS and not info.is_required()
            and not _base_type(info.annotation)[1] and _is_empty(values[name])]


def validate(values: dict[str, Any], with_job: bool = False) -> tuple[TrainConfig | None, str]:
    """(config, "") or (None, 'field: message; ...'); `with_job`: the Resources fields must be valid too."""
    empty = emptied(TrainConfig, values) + (emptied(JobResources, values) if with_job else [])
    if empty:
        return None, "; ".join(empty)
    try:
        config = TrainConfig(**config_dict(values))
        if with_job:
            JobResources(**schema_kwargs(JobResources, values))
        return config, ""
    except ValidationError as e:
        return None, format_validation_error(e, whole="")   # a rule over several fields names them itself


def job_body(values: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The JobCreate body of docs/API.md: the config and the Resources fields that are set."""
    return {"config": config.model_dump(mode="json"), **schema_kwargs(JobResources, values)}


def to_yaml(values: dict[str, Any]) -> str:
    """A saved form: the TrainConfig fields that are set, plus a `job:` section (the Resources fields)."""
    data = config_dict(values)
    job = schema_kwargs(JobResources, values)
    if job:
        data["job"] = job
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def job_values(job: dict[str, Any]) -> dict[str, Any]:
    """Form values that submit `job` (an API JobPublic) again: its config, without what the server set for
    it (its output dir), and its resources. ValueError as from_yaml (a config from an older schema)."""
    config = {k: v for k, v in job["config"].items() if k not in JOB_SET_FIELDS}
    resources = JobResources.of_stored_job(job).model_dump(exclude_none=True)
    return from_yaml(json.dumps({"config": config, **resources}))


def from_yaml(text: str) -> dict[str, Any]:
    """Values for the form from a saved YAML (or a bare TrainConfig YAML/JSON); missing keys take the
    schema default. ValueError naming the line or field for bad YAML, an unknown key, a bad value: a form
    filled with a value its input cannot show would only show "Error"."""
    data, job = parse_job_file(text)
    values: dict[str, Any] = {}
    for name, info in TrainConfig.model_fields.items():
        if name in data:
            values[name] = data[name]
        elif not info.is_required():
            values[name] = info.default
    for name in JOB_FIELDS:
        if name in job:
            values[name] = job[name]
    return values
