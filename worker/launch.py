"""`python -m worker.launch [--death-signal NAME] PARENT_PID CMD...`: exec CMD so that it receives a signal
(SIGTERM unless named) when the process that started it dies (Linux PR_SET_PDEATHSIG), even by SIGKILL.

The worker launches trainers this way: torchrun forwards the SIGTERM to its ranks, which save a checkpoint
and exit; the job's lease then lapses and it resumes elsewhere. `paratrain serve` launches its local worker
with SIGKILL: a worker left behind by a server killed -9 would go on under the same name as the one the
restarted server starts, so both would run jobs; killed, its trainers save and stop (their own death
signal), and the new worker re-queues the job when it registers."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    death_signal = signal.SIGTERM
    if argv[:1] == ["--death-signal"]:
        death_signal, argv = signal.Signals[f"SIG{argv[1].upper().removeprefix('SIG')}"], argv[2:]
    parent, cmd = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
