"""VRAM estimate and presets. The estimator is `trainer_core.vram` (imported on first use, so the server
runs without it: 501 until it exists)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field

from server.deps import UserAuth
from trainer_core.config import TrainConfig

router = APIRouter(tags=["estimate"], dependencies=[UserAuth])


class EstimateRequest(BaseModel):
    config: TrainConfig
    gpu_mem_gb: float = Field(80.0, gt=0, le=4096)


def _vram() -> ModuleType:
    try:
        return importlib.import_module("trainer_core.vram")
    except ImportError:
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, "the VRAM estimator is not installed") from None


@router.post("/estimate")
def estimate(body: EstimateRequest) -> dict[str, Any]:
    return _vram().estimate(body.config, body.gpu_mem_gb)


@router.get("/presets")
def presets(gpu_mem_gb: Annotated[float, Query(gt=0, le=4096)] = 80.0,
            model: Annotated[str, Query(min_length=1, max_length=500)] = "0.5B") -> list[dict[str, Any]]:
    return _vram().presets(gpu_mem_gb, model)
