"""Distributed setup in one place (nanochat's compute_init pattern): torchrun's env -> process group."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer_core import exit_codes


@dataclass
class DistEnv:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

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
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
        return DistEnv(True, rank, local_rank, world, device)
    if under_torchrun and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("paratrain: started by torchrun with several processes but without --ddp; add --ddp", file=sys.stderr)
        raise SystemExit(exit_codes.BAD_INPUT)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    return DistEnv(False, 0, 0, 1, device)


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


def broadcast_object(env: DistEnv, obj):
    if not env.ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(env: DistEnv, obj) -> list:
    if not env.ddp:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.ddp:
        dist.barrier()


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
