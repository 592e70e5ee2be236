"""`paratrain worker --server URL --token T`. Heavy imports happen in run(), not here."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="Server URL (env PARATRAIN_WORKER_SERVER_URL; default http://127.0.0.1:8000).")
    parser.add_argument("--token", help="Worker token (env PARATRAIN_WORKER_TOKEN; the server's "
                                        "<data_dir>/worker_token).")
    parser.add_argument("--token-file", help="Read the worker token from this file.")
    parser.add_argument("--name", help="Worker name, unique per server: a second worker under a name pushes the "
                                       "first one out (env PARATRAIN_WORKER_NAME; default: hostname).")
    parser.add_argument("--gpus", help="'auto' (NVML, default), 'none', or indices like '0,1' "
                                       "(env PARATRAIN_WORKER_GPUS).")
    parser.add_argument("--max-cpu-jobs", type=int, help="CPU jobs run at the same time (env "
                                                         "PARATRAIN_WORKER_MAX_CPU_JOBS; default 1).")
    parser.add_argument("--rdzv-address", help="How other workers reach this machine for multi-node jobs "
                                               "(default: hostname; '' takes no multi-node jobs).")


def settings_from_args(args: argparse.Namespace):  # -> WorkerSettings
    from pathlib import Path

    from worker.settings import WorkerSettings

    overrides = {"server_url": args.server, "token": args.token, "name": args.name, "gpus": args.gpus,
                 "max_cpu_jobs": args.max_cpu_jobs, "rdzv_address": args.rdzv_address}
    if args.token_file:
        overrides["token"] = Path(args.token_file).read_text().strip()
    return WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})


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
    client = ServerClient(settings.server_url, settings.token, settings.request_timeout_s)
    agent = Agent(settings, client, detect_gpus(settings.gpus))
    agent.install_signal_handlers()
    try:
        return agent.run()
    finally:
        client.close()
