"""The job-config schema, command-line previews and dataset checks: what a form needs before submitting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server import crud
from server.deps import SettingsDep, UserAuth, error_responses
from server.errors import FieldError
from server.models import CommandPublic, JobCreate
from server.paths import confine_data_file, confine_field, is_dir
from server.settings import Settings
from trainer_core.command import placeholder_rendezvous, trainer_argv
from trainer_core.config import SAMPLE_SHAPING_FIELDS, TrainConfig, closest_name

router = APIRouter(tags=["configs"], dependencies=[UserAuth], responses=error_responses(401, 413))


class DatasetCheck(BaseModel):
    """data_path (+ base_model for the tokenizer) and, optionally, other TrainConfig fields: those that shape
    samples, batches and rows (config.SAMPLE_SHAPING_FIELDS, which the UI sends) change the summary."""

    model_config = ConfigDict(extra="allow")

    data_path: str = Field(min_length=1)
    base_model: str | None = None


class DatasetCheckResult(BaseModel):
    """Errors (`FILE:LINE: ...`), or the summary of `trainer_core.data_cli.summarize` when a tokenizer
    (base_model) was given; with no base_model only the record count."""

    model_config = ConfigDict(extra="allow")

    data_path: str
    records: int | None = None
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list, description="Valid, but maybe not what was meant (keys "
                                                                 "paratrain ignores).")
    note: str | None = None
    validation_records: int | None = Field(None, description="Records of val_data_path, when it was given and is "
                                                             "valid (its bad lines are among `errors`).")


@router.get("/config-schema")
def config_schema() -> dict[str, Any]:
    return TrainConfig.model_json_schema()


@router.post("/command-preview", response_model=CommandPublic)
def command_preview(job_in: JobCreate, settings: SettingsDep) -> CommandPublic:
    """The command a worker would run for this job: paths checked and resolved as on submit; the job's
    id, unknown until then, is `ID` in its output directory."""
    config = crud.resolve_config(job_in.config, settings=settings, job_id="ID")
    return CommandPublic(argv=trainer_argv(config, nproc=job_in.procs_per_node,
                                           rendezvous=placeholder_rendezvous(job_in.nodes)))


@router.post("/datasets/check", response_model=DatasetCheckResult)
def check_dataset(body: DatasetCheck, settings: SettingsDep) -> DatasetCheckResult:
    from trainer_core.data import has_tokenizer_files  # numpy etc.: only when asked
    from trainer_core.data_cli import add_validation_file, check_lines

    check_extra_fields(body)
    # a path that is no file is a 422, as for a job; a file's bad lines are the answer
    path = confine_data_file(body.data_path, ("body", "data_path"), settings)
    val_given = (body.model_extra or {}).get("val_data_path")
    val_path = confine_data_file(str(val_given), ("body", "val_data_path"), settings) if val_given else None
    model = None if body.base_model is None else model_dir(body.base_model, settings)
    if model is None or not has_tokenizer_files(model):
        note = None if model is None else f"{body.base_model} has no tokenizer: only the lines were checked"
        found = {**check_lines(path), "note": note}
    else:
        found = summarize_dataset(body, path, model)
    if val_path is not None:
        add_validation_file(found, val_path)
    return DatasetCheckResult(**found)


def check_extra_fields(body: DatasetCheck) -> None:
    """The extra keys must be TrainConfig fields with valid values: a misspelt one (max_seq_length) would
    otherwise be ignored, and the summary computed with a default the caller did not mean."""
    extra = body.model_extra or {}
    for key in extra:
        if key not in TrainConfig.model_fields:
            close = closest_name(key, TrainConfig.model_fields)
            raise FieldError(("body", key), f"unknown field {key!r}" + (f"; did you mean {close!r}?" if close else
                                                                       " (the fields: GET /api/config-schema)"))
    train_config(**{**extra, "base_model": body.base_model or "model", "data_path": body.data_path})


def train_config(**fields: Any) -> TrainConfig:
    """TrainConfig(**fields), or a 422 naming the first bad field of the request body."""
    from pydantic import ValidationError

    try:
        return TrainConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise FieldError(("body", *[str(p) for p in err["loc"]]), err["msg"]) from None


def model_dir(base_model: str, settings: Settings) -> Path:
    model = confine_field(base_model, ("body", "base_model"), settings)
    if not is_dir(model):
        raise FieldError(("body", "base_model"), f"{base_model!r}: no such model directory under the data root")
    return model


def summarize_dataset(body: DatasetCheck, path: Path, model: Path) -> dict[str, Any]:
    from trainer_core.data_cli import summarize

    sample_fields = {k: v for k, v in (body.model_extra or {}).items()
                     if k in SAMPLE_SHAPING_FIELDS and v not in (None, "")}
    cfg = train_config(**sample_fields, base_model=str(model), data_path=str(path))
    try:
        summary = summarize(cfg)
    except (OSError, ValueError) as e:  # an unreadable tokenizer
        raise FieldError(("body", "base_model"), f"{body.base_model}: cannot load its tokenizer ({e})") from None
    summary["data_path"] = str(path)
    return summary
