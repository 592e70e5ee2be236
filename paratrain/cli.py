"""`paratrain` command line: one entry point, each subcommand owned by the package that implements it.

Each owner module exposes `add_arguments(parser)` and `run(args) -> int`; they are imported only when
their subcommand runs (module top levels stay light, so `paratrain --help` is instant).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141   # as a shell reports death by SIGINT, SIGPIPE

# subcommand -> (owner module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.cli", "Start server + UI + one local worker (the embedded default)."),
    "worker": ("worker.cli", "Run a worker that claims jobs from a server and launches torchrun."),
    "submit": ("paratrain.submit", "Queue a saved job file (the UI's Save as YAML) on a server; --follow prints "
                                   "its progress to the end."),
    "jobs": ("paratrain.jobs", "List, show, follow, cancel or retry the server's jobs, or print a job's log (the "
                               "UI's Jobs tab in a terminal)."),
    "train": ("trainer_core.train", "Train in this process with the guide's flags (several processes: "
                                    "torchrun --nproc_per_node N -m trainer_core.train ... --ddp)."),
    "generate": ("trainer_core.generate", "Continue the branches of a main text with a trained adapter."),
    "data": ("trainer_core.data_cli", "Check a Parallel JSONL dataset: errors with FILE:LINE, or a summary."),
    "make-tiny-model": ("trainer_core.demo", "Build a tiny random Qwen2 model + locally trained tokenizer."),
    "make-demo-data": ("trainer_core.demo", "Write a demo Parallel JSONL made from Python's module docs."),
    "presets": ("trainer_core.vram", "Print VRAM-guided presets and peak-memory estimates."),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only `command`'s owner is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="paratrain", description="Parallel-branch LoRA fine-tuning manager.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _command=name)
        if name == command:
            owner = importlib.import_module(module)
            add = getattr(owner, f"add_{name.replace('-', '_')}_arguments", None) or owner.add_arguments
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        from trainer_core.config import parse_args_with_hints   # pydantic: a Ctrl-C may come while it loads

        args = parse_args_with_hints(build_parser(command), argv)   # imports the owner: torch, seconds
        owner = importlib.import_module(args._module)
        run = getattr(owner, f"run_{args._command.replace('-', '_')}", None) or owner.run
        return int(run(args) or 0)
    except KeyboardInterrupt:   # Ctrl-C while a module loads, before a command handles signals itself
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:   # `paratrain jobs logs 5 | head -1`: the reader has what it wanted
        # Python would report the pipe again when it flushes stdout at exit: point stdout at nothing first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
