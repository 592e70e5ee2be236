"""Distributed setup in one place (nanochat's compute_init pattern): torchrun's env -> process group."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainer_core import exit_codes

# How long a rank waits in one collective of training for the others before it fails, so that a hung rank
# becomes an error. Unset: torch's own, 10 minutes on NCCL and 30 on gloo.
COLLECTIVE_TIMEOUT_ENV = "PARATRAIN_COLLECTIVE_TIMEOUT_S"
# The one wait that is long by design: while rank 0 tokenises a dataset (a gigabyte takes about ten minutes on
# one core) the other ranks wait for it, and on boxes that do not share its token cache each rank tokenises
# for itself. Those waits go through a gloo group of their own with this timeout, not the training's.
PREPARE_TIMEOUT = timedelta(hours=24)


@dataclass
class DistEnv:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    prepare_group: Any = None  # the process group of the waits before training (PREPARE_TIMEOUT)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def compute_init(want_ddp: bool) -> DistEnv:
    """Start the process group when running under torchrun with --ddp: NCCL on CUDA, gloo on CPU."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if want_ddp and under_torchrun:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        if cuda:
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=collective_timeout())
        prepare_group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
        return DistEnv(True, rank, local_rank, world, device, prepare_group)
    if under_torchrun and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("paratrain: started by torchrun with several processes but without --ddp; add --ddp", file=sys.stderr)
        raise SystemExit(exit_codes.BAD_INPUT)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    return DistEnv(False, 0, 0, 1, device)


def collective_timeout() -> timedelta | None:
    """$PARATRAIN_COLLECTIVE_TIMEOUT_S as a timedelta; None (torch's default) when unset."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
        if not 0 < seconds < float("inf"):
            raise ValueError
    except ValueError:
        print(f"paratrain: {COLLECTIVE_TIMEOUT_ENV}={value!r}: expected a number of seconds > 0", file=sys.stderr)
        raise SystemExit(exit_codes.BAD_INPUT) from None
    return timedelta(seconds=seconds)


def compute_cleanup(env: DistEnv) -> None:
    if env.ddp and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(env: DistEnv, value: float) -> float:
    if not env.ddp:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item())


def any_rank(env: DistEnv, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true on every rank if it is true on any (one collective for them all): all ranks agree on
    when to stop, so none hangs."""
    if not env.ddp:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return tuple(bool(v > 0) for v in t.tolist())


def broadcast_object(env: DistEnv, obj, group=None):
    if not env.ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather_objects(env: DistEnv, obj) -> list:
    if not env.ddp:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv, group=None) -> None:
    if env.ddp:
        dist.barrier(group=group)


def print0(env: DistEnv, text: str) -> None:
    """Human-readable progress: rank 0 only, on stderr (stdout carries the machine-readable JSON lines)."""
    if env.is_main:
        write_line(text, sys.stderr)


def write_line(text: str, stream) -> None:
    """print(), except that a reader gone away (the worker died; the kernel is sending us SIGTERM) must not
    kill training before it saves: the stream then goes to /dev/null and training carries on to its stop."""
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
