"""Resumable checkpoints: adapter weights + optimiser + scheduler + float16 loss scale + step/data position,
as one directory written atomically (tmp dir, then rename), so a kill at any moment leaves either the old or
the new one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEEP_CHECKPOINTS = 2
STATE_FILE = "trainer_state.json"
FILES = ("adapter.safetensors", "optimizer.pt", STATE_FILE)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    # complete ones only: a directory being pruned (or copied for a retry while that happened) may lack files
    done = sorted(p for p in root.glob("step_*") if all((p / f).exists() for f in FILES)) if root.exists() else []
    return done[-1] if done else None


def save_checkpoint(output_dir: str | Path, *, step: int, lora_weights: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                    state: dict) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in lora_weights.items()}, str(tmp / "adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state()},
               tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    # A later step than this one was saved by a run this one took the directory over from (trainer_core/owner.py),
    # while it picked its checkpoint: it is not this run's history, and it must not outlive this run's own.
    for stale in root.glob("step_*"):
        if stale.name > final.name:
            shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def delete_checkpoints(output_dir: str | Path) -> None:
    shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)


def read_state(path: Path) -> dict:
    """The trainer state of a checkpoint: step, epoch position, and the settings of its run."""
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(lora weights, optimizer/scheduler blob, trainer state)."""
    weights = load_file(str(path / "adapter.safetensors"))
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    return weights, blob, read_state(path)
