"""`python -m worker.launch PARENT_PID CMD...`: exec CMD so that it receives SIGTERM when the worker that
started it dies (Linux PR_SET_PDEATHSIG), even by SIGKILL. torchrun forwards that SIGTERM to its ranks,
which save a checkpoint and exit; the job's lease then lapses and it resumes elsewhere."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, cmd = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the worker died before the prctl took effect
            sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
