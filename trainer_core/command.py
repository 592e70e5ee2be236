"""The trainer's command line, derived from the job's TrainConfig (the server shows the same argv)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from trainer_core.config import TrainConfig

DEFAULT_TRAINER = ("-m", "trainer_core.train")


class Rendezvous(BaseModel):
    """One node's part of a multi-node job: every node's torchrun joins the same c10d rendezvous, hosted by
    node 0's torchrun at `endpoint`."""

    nnodes: int = Field(ge=2)
    node: int = Field(ge=0, description="This worker's node in the gang (0 hosts the rendezvous store).")
    endpoint: str = Field(description="host:port of node 0's rendezvous store.")
    run_id: str = Field(description="Names this attempt's rendezvous, so a stale node of an earlier attempt never "
                                    "joins it.")
    local_addr: str = Field(description="This node's address, as the other nodes reach it.")


def placeholder_rendezvous(nnodes: int, run_id: str = "paratrain-job<id>-attempt<n>") -> Rendezvous | None:
    """Node 0's rendezvous as a preview shows it before the gang is placed (None for a single-node job)."""
    if nnodes == 1:
        return None
    return Rendezvous(nnodes=nnodes, node=0, endpoint="<node 0 address>:<port>", run_id=run_id,
                      local_addr="<node 0 address>")


def trainer_argv(config: TrainConfig, *, nproc: int, rendezvous: Rendezvous | None = None,
                 trainer: Sequence[str] = DEFAULT_TRAINER, use_torchrun: bool = True) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m trainer_core.train <flags>`, or for one node of a
    multi-node job `torchrun --nnodes M --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...`.

    `--standalone` gives every job its own c10d rendezvous on a free localhost port, so jobs sharing a
    machine never collide. More than one process means DDP, so `--ddp` is implied. `trainer` and
    `use_torchrun` exist for tests (a fake trainer, launched with plain python).
    """
    world_size = nproc * (rendezvous.nnodes if rendezvous else 1)
    if world_size > 1 and not config.ddp:
        config = config.model_copy(update={"ddp": True})
    flags = config.to_cli_args()
    if not use_torchrun:
        return ["python", *trainer, *flags]
    if rendezvous is None:
        return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", *trainer, *flags]
    return ["torchrun", f"--nnodes={rendezvous.nnodes}", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={rendezvous.endpoint}", f"--rdzv_id={rendezvous.run_id}",
            # Node 0 hosts the store; the others only connect (they wait for it up to the join timeout).
            f"--rdzv_conf=is_host={int(rendezvous.node == 0)}", f"--local_addr={rendezvous.local_addr}",
            # A failed node fails the job; the server re-queues the whole gang, which resumes from a checkpoint.
            "--max_restarts=0", *trainer, *flags]
