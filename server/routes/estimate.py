"""VRAM estimate and presets. The estimator is `trainer_core.vram` (imported on first use, so the server
runs without it: 501 until it exists)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import Field

from server.deps import SettingsDep, UserAuth, error_responses
from server.errors import FieldError
from server.models import RequestBody
from server.paths import confine, is_dir
from server.settings import Settings
from trainer_core.config import TrainConfig

router = APIRouter(tags=["estimate"], dependencies=[UserAuth], responses=error_responses(401, 413))


class MeasuredPeak(RequestBody):
    """A job that ran on a GPU and its recorded peak: calibrates the estimate (trainer_core.vram)."""

    config: dict[str, Any]
    peak_mem_gb: float = Field(gt=0)
    tokens_per_text: int | None = Field(None, ge=1)


class EstimateRequest(RequestBody):
    config: TrainConfig
    gpu_mem_gb: float = Field(80.0, gt=0, le=4096)
    measured: list[MeasuredPeak] | None = Field(None, max_length=1000)
    tokens_per_text: int | None = Field(None, ge=1, description="Replaces the worst case max_seq_len.")


def _vram() -> ModuleType:
    try:
        return importlib.import_module("trainer_core.vram")
    except ImportError:
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, "the VRAM estimator is not installed") from None


def _local_model(model: str, settings: Settings) -> str:
    """A model directory under the roots, as an absolute path; anything else (a size like '0.5B') as given."""
    assert settings.data_root is not None
    try:
        path = confine(model, roots=settings.read_roots, base=settings.data_root)
    except ValueError:
        return model
    return str(path) if is_dir(path) else model


@router.post("/estimate")
def estimate(body: EstimateRequest, settings: SettingsDep) -> dict[str, Any]:
    vram = _vram()
    config = body.config.model_copy(update={"base_model": _local_model(body.config.base_model, settings)})
    try:
        measured = [m.model_dump(exclude_none=True) for m in body.measured or []]
        return vram.estimate(config, body.gpu_mem_gb, measured, tokens_per_text=body.tokens_per_text)
    except (ValueError, OSError) as e:  # a model whose shape the estimator cannot tell
        raise FieldError(("body", "config", "base_model"), str(e)) from None


@router.get("/presets")
def presets(settings: SettingsDep, gpu_mem_gb: Annotated[float, Query(gt=0, le=4096, allow_inf_nan=False)] = 80.0,
            model: Annotated[str, Query(min_length=1, max_length=500)] = "0.5B") -> list[dict[str, Any]]:
    vram = _vram()
    try:
        return vram.presets(gpu_mem_gb, _local_model(model, settings))
    except (ValueError, OSError) as e:
        raise FieldError(("query", "model"), str(e)) from None
