"""Resumable checkpoints: adapter weights + optimiser + scheduler + float16 loss scale + step/data position,
as one directory written atomically (tmp dir, then rename), so a kill at any moment leaves either the old or
the new one."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEEP_CHECKPOINTS = 2
STATE_FILE = "trainer_state.json"
FILES = ("adapter.safetensors", "optimizer.pt", STATE_FILE)
# Free space under which a failed write is taken for a full disk: torch.save reports one as "unexpected pos
# ..." or "basic_ios::clear: iostream error", not ENOSPC, and the worker and the user look for that word.
FULL_DISK_BYTES = 16 * 2**20


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
    try:
        with disk_full_named(root, f"checkpoint step {step}"):
            save_file({k: v.contiguous() for k, v in lora_weights.items()}, str(tmp / "adapter.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state()},
                       tmp / "optimizer.pt")
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # the space it took, and no half checkpoint left about
        raise
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


def save_replacing(obj, path: Path) -> None:
    """torch.save to a temporary file, then into place: a write that fails (a full disk) leaves the previous
    file whole instead of a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def disk_full_named(where: Path, what: str):
    """A write that failed on a (nearly) full disk raises OSError ENOSPC "No space left on device", whatever
    the library said."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            raise e from None
        if free >= FULL_DISK_BYTES:
            raise
        raise OSError(errno.ENOSPC, f"No space left on device writing {what} under {where} ({free // 1024} KiB "
                                    f"free): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def read_state(path: Path) -> dict:
    """The trainer state of a checkpoint: step, epoch position, and the settings of its run."""
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(lora weights, optimizer/scheduler blob, trainer state)."""
    weights = load_file(str(path / "adapter.safetensors"))
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    return weights, blob, read_state(path)
