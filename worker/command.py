"""The trainer's command line, derived from the job's TrainConfig (the server shows the same argv)."""

from __future__ import annotations

from collections.abc import Sequence

from trainer_core.config import TrainConfig

DEFAULT_TRAINER = ("-m", "trainer_core.train")


def trainer_argv(config: TrainConfig, *, nproc: int, trainer: Sequence[str] = DEFAULT_TRAINER,
                 use_torchrun: bool = True) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m trainer_core.train <flags>`.

    `--standalone` gives every job its own c10d rendezvous on a free localhost port, so jobs sharing a
    machine never collide. More than one process means DDP, so `--ddp` is implied. `trainer` and
    `use_torchrun` exist for tests (a fake trainer, launched with plain python).
    """
    if nproc > 1 and not config.ddp:
        config = config.model_copy(update={"ddp": True})
    flags = config.to_cli_args()
    if not use_torchrun:
        return ["python", *trainer, *flags]
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", *trainer, *flags]
