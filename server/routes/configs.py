"""The job-config schema, command-line previews and dataset checks: what a form needs before submitting."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server.deps import SettingsDep, UserAuth
from server.errors import FieldError
from server.models import CommandPublic, JobCreate
from server.paths import confine
from trainer_core.config import TrainConfig
from worker.command import trainer_argv

router = APIRouter(tags=["configs"], dependencies=[UserAuth])


class DatasetCheck(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the UI may send its whole form

    data_path: str = Field(min_length=1)
    base_model: str | None = None


class DatasetCheckResult(BaseModel):
    data_path: str
    records: int | None = None
    errors: list[str] = Field(default_factory=list)


@router.get("/config-schema")
def config_schema() -> dict[str, Any]:
    return TrainConfig.model_json_schema()


@router.post("/command-preview", response_model=CommandPublic)
def command_preview(job_in: JobCreate) -> CommandPublic:
    return CommandPublic(argv=trainer_argv(job_in.config, nproc=job_in.procs_per_node))


@router.post("/datasets/check", response_model=DatasetCheckResult)
def check_dataset(body: DatasetCheck, settings: SettingsDep) -> DatasetCheckResult:
    from trainer_core.data import DataError, validate_file  # numpy etc.: only when asked

    assert settings.data_root is not None
    try:
        path = confine(body.data_path, roots=settings.read_roots, base=settings.data_root)
    except ValueError as e:
        raise FieldError(("body", "data_path"), str(e)) from None
    try:
        return DatasetCheckResult(data_path=str(path), records=validate_file(path))
    except DataError as e:
        return DatasetCheckResult(data_path=str(path), errors=e.lines)
