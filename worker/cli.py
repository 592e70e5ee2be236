"""`paratrain worker --server URL --token T`. Heavy imports happen in run(), not here."""

from __future__ import annotations

import argparse

from paratrain.flags import add_settings_flag, settings_overrides

# flag -> WorkerSettings field
SETTINGS_FLAGS = {"--server": "server_url", "--token": "token", "--name": "name", "--gpus": "gpus",
                  "--max-cpu-jobs": "max_cpu_jobs", "--rdzv-address": "rdzv_address"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from worker.settings import WorkerSettings

    for flag, field in SETTINGS_FLAGS.items():
        add_settings_flag(parser, flag, WorkerSettings, field, type=int if field == "max_cpu_jobs" else str,
                          default_text={"name": "this machine's hostname", "rdzv_address": "hostname",
                                        "token": "none"}.get(field))
    parser.add_argument("--token-file", help="Read the worker token from this file (better than --token, which "
                                             "every user of the machine can see).")


def settings_from_args(args: argparse.Namespace):  # -> WorkerSettings
    from pathlib import Path

    from worker.settings import WorkerSettings

    overrides = settings_overrides(args, list(SETTINGS_FLAGS.values()))
    if args.token_file:
        overrides["token"] = Path(args.token_file).read_text().strip()
    return WorkerSettings(**overrides)


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from worker.agent import Agent
    from worker.client import ServerClient
    from worker.gpus import detect_gpus

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns everything else
    from pydantic import ValidationError

    from trainer_core.config import format_validation_error

    try:
        settings = settings_from_args(args)
    except OSError as e:   # --token-file that cannot be read
        print(f"paratrain worker: --token-file {args.token_file}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ValidationError as e:   # a flag or a PARATRAIN_WORKER_* variable
        print(f"paratrain worker: {format_validation_error(e)}", file=sys.stderr)
        return 2
    if args.token:
        logging.getLogger("paratrain.worker").warning(
            "--token is visible to every user of this machine (ps, /proc); prefer --token-file or "
            "PARATRAIN_WORKER_TOKEN")
    if not settings.token:
        print("paratrain worker: a token is needed (--token, --token-file or PARATRAIN_WORKER_TOKEN)", file=sys.stderr)
        return 2
    try:
        gpus = detect_gpus(settings.gpus)
    except ValueError as e:
        print(f"paratrain worker: {e}", file=sys.stderr)
        return 2
    client = ServerClient(settings.server_url, settings.token, settings.request_timeout_s)
    agent = Agent(settings, client, gpus)
    agent.install_signal_handlers()
    try:
        return agent.run()
    finally:
        client.close()
