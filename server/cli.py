"""`paratrain serve`: server + UI + one local worker in one process tree, all data under one directory.
Heavy imports happen in run(), not here."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from paratrain.flags import add_settings_flag, settings_overrides
from trainer_core.demo import DEMO_DATA, DEMO_MODEL, demo_job

log = logging.getLogger("paratrain.serve")


SETTINGS_FLAGS = {"--data-dir": "data_dir", "--host": "host", "--port": "port"}   # flag -> Settings field
LOCK_FILE = "server.lock"   # in the data dir: whose it is (lock_data_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.settings import Settings

    for flag, field in SETTINGS_FLAGS.items():
        add_settings_flag(parser, flag, Settings, field, type=int if field == "port" else str)
    parser.add_argument("--no-worker", action="store_true", help="Do not start the local worker.")
    parser.add_argument("--worker-gpus", default=None,
                        help="GPUs of the local worker: auto, none, or 0,1 (default: PARATRAIN_WORKER_GPUS, else auto).")
    parser.add_argument("--no-demo", action="store_true", help="Do not create the demo model and dataset.")


def ensure_demo_assets(data_dir: Path) -> None:
    """On first start, the tiny demo model and dataset, so one click (or one curl) trains something."""
    model_dir, data_path = data_dir / DEMO_MODEL, data_dir / DEMO_DATA
    if model_dir.is_dir() and data_path.is_file():
        return
    try:
        from trainer_core.demo import make_demo_data, make_tiny_model
    except ImportError as e:
        log.warning("demo assets skipped (%s)", e)
        return
    print(f"paratrain: creating the demo model and dataset under {data_dir} (first start only)...", flush=True)
    if not data_path.is_file():
        make_demo_data(data_path)
    if not model_dir.is_dir():
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        make_tiny_model(tmp)
        tmp.rename(model_dir)  # a half-written model dir never looks finished


def local_worker_command(url: str, gpus: str | None, environ: Mapping[str, str]) -> list[str]:
    """`paratrain worker` for this server. Its other settings come from PARATRAIN_WORKER_* as for any worker;
    its name is `<host>-local` unless PARATRAIN_WORKER_NAME says otherwise."""
    # worker.launch: the worker dies with this process, even when it is killed -9 (see there why)
    argv = [sys.executable, "-m", "worker.launch", "--death-signal", "KILL", str(os.getpid()),
            sys.executable, "-m", "worker", "--server", url]
    if not environ.get("PARATRAIN_WORKER_NAME"):
        argv += ["--name", f"{socket.gethostname()}-local"]
    if gpus is not None:
        argv += ["--gpus", gpus]
    return argv


def start_local_worker(url: str, settings, gpus: str | None) -> subprocess.Popen[bytes]:
    from server.auth import ensure_tokens
    from worker.runner import SAFE_PATH_ENV

    argv = local_worker_command(url, gpus, os.environ)
    # The token by environment (a command line shows in `ps`), and the server's own: a token set by
    # PARATRAIN_WORKER_TOKEN is in no file, and an older <data_dir>/worker_token may hold another.
    env = {**os.environ, "PARATRAIN_CACHE": os.environ.get("PARATRAIN_CACHE", str(settings.data_dir / "cache")),
           "PARATRAIN_WORKER_TOKEN": ensure_tokens(settings).worker, **SAFE_PATH_ENV,
           # serve's Ctrl-C: the jobs are handed back at once (they resume at the next start), not waited for
           "PARATRAIN_WORKER_STOP_MODE": "cold"}
    # Its own session: a terminal's Ctrl-C reaches only us, and we stop the worker in order (below).
    return subprocess.Popen(argv, env=env, start_new_session=True)


def stop_local_worker(worker: subprocess.Popen[bytes], grace_s: float = 60) -> None:
    """One SIGTERM, a cold stop in the local worker's stop mode (start_local_worker): its jobs save a checkpoint
    and go back to the queue, to resume at the next start."""
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(grace_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def banner(url: str, token: str, ui: bool, hidden: tuple[str, str] | None = None,
           worker_token_file: Path | None = None) -> str:
    """`hidden` = (where the token is, a shell expression for it): used when stdout is not a terminal (a log
    file, a journal), so that no log ever holds the token. `worker_token_file`: no local worker, so say how
    to attach one (None: a local worker runs, or the worker token is set by environment)."""
    shown = token if hidden is None else hidden[1]
    # -w '\n': the answer is one JSON line without a newline, which would leave the shell prompt after it
    curl = (f"curl -X POST {url}/api/jobs -H \"Authorization: Bearer {shown}\" -H 'Content-Type: application/json' "
            f"-d '{json.dumps(demo_job())}' -w '\\n'")
    lines = ["", "paratrain is running",
             f"  API token: {token}" if hidden is None else f"  API token: {hidden[0]} (not printed to a log)",
             f"  API docs:  {url}/docs"]
    if ui:
        lines.append(f"  UI:        {url}/ui  (log in with the token)")
    lines += ["  Train the demo model on the demo data:", f"    {curl}"]
    if worker_token_file is not None:
        lines += ["  No local worker (--no-worker): jobs wait for one. Attach a worker with",
                  f"    paratrain worker --server {url} --token-file {worker_token_file} --name <unique name>"]
    return "\n".join(lines + [""])


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from server.main import create_app
    from server.settings import SERVER_URL_FILE, Settings
    from trainer_core.config import format_validation_error

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = Settings(**settings_overrides(args, list(SETTINGS_FLAGS.values())))
    except (ValueError, SettingsError) as e:   # a flag or a PARATRAIN_* variable
        detail = (format_validation_error(e, whole="settings") if isinstance(e, ValidationError) else
                  f"{e} (list settings take JSON: PARATRAIN_EXTRA_ROOTS='[\"/models\"]')")
        print(f"paratrain serve: {detail}", file=sys.stderr)
        return 2
    # Bound before anything is announced or started: a busy port must not print "running" and start a
    # second local worker under the first one's name.
    try:
        listener = bind_socket(settings.host, settings.port)
    except OSError as e:
        print(f"paratrain serve: cannot listen on {settings.host}:{settings.port}: {e.strerror or e} "
              f"(another paratrain serve? choose one with --port)", file=sys.stderr)
        return 2
    try:
        data_dir_lock = lock_data_dir(settings.data_dir)   # held until this process exits, even by kill -9
    except DataDirError as e:
        print(f"paratrain serve: {e}", file=sys.stderr)
        return 2
    if not args.no_demo:
        ensure_demo_assets(settings.data_dir)
    app = create_app(settings)
    url = settings.local_url
    # `paratrain submit` finds the server here, as it finds the token (serve may run on another --port)
    (settings.data_dir / SERVER_URL_FILE).write_text(url + "\n", encoding="utf-8")
    ui_mounted = any(getattr(route, "path", "") == "/ui" for route in app.routes)
    hidden = None
    if not sys.stdout.isatty():
        hidden = (("in $PARATRAIN_USER_TOKEN", "$PARATRAIN_USER_TOKEN") if settings.user_token else
                  (f"in {settings.data_dir / 'token'}", f"$(cat {settings.data_dir / 'token'})"))
    attach_with = (settings.data_dir / "worker_token" if args.no_worker and not settings.worker_token else None)
    print(banner(url, app.state.tokens.user, ui_mounted, hidden, attach_with), flush=True)

    worker = None if args.no_worker else LocalWorker(url, settings, args.worker_gpus)
    # keep-alive: longer than a client's pause between pooled requests (uvicorn's default 5 s races with them)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                            timeout_keep_alive=75, timeout_graceful_shutdown=5)
    server = _make_server(config, on_first_exit=lambda: worker and worker.stop(),
                          on_second_exit=lambda: worker and worker.kill())
    if worker is not None:
        worker.start()
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        if worker is not None:
            worker.stop()
        data_dir_lock.close()
    return 0


class DataDirError(Exception):
    """The data dir cannot be this server's: not creatable, not writable, or another server's."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Make the data dir if missing (the owner's alone, as in create_app) and take its lock file. Two servers
    on one data dir would both hand out its jobs and reap their leases; the second one is refused."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = open(data_dir / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as e:
        raise DataDirError(f"--data-dir {data_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process"
        lock.close()
        raise DataDirError(f"--data-dir {data_dir} is in use by another paratrain serve ({holder}): stop it, or "
                           "give this one another --data-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn, as it would bind it (SO_REUSEADDR; IPv6 for an IPv6 host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class LocalWorker:
    """The embedded worker subprocess, restarted if it dies (its new registration re-queues its jobs)."""

    def __init__(self, url: str, settings, gpus: str | None) -> None:  # type: ignore[no-untyped-def]
        self.url, self.settings, self.gpus = url, settings, gpus
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        self.process = start_local_worker(self.url, self.settings, self.gpus)
        threading.Thread(target=self._watch, daemon=True, name="local-worker-watch").start()

    def _watch(self) -> None:
        from worker.agent import EXIT_SUPERSEDED

        while not self.stopping.wait(2):
            if self.process is not None and self.process.poll() is not None and not self.stopping.is_set():
                if self.process.returncode == EXIT_SUPERSEDED:   # restarted, it would push the other one out
                    log.error("the local worker stopped: another worker registered under its name")
                    return
                if self.process.returncode == 2:   # bad settings (--worker-gpus...): it would fail the same way
                    log.error("the local worker refused its settings (above); not starting it again")
                    return
                log.warning("the local worker exited with %s; starting it again", self.process.returncode)
                self.process = start_local_worker(self.url, self.settings, self.gpus)
        # The kernel sends the parent-death signal (SIGKILL) when the *thread* that started the worker ends:
        # this one waits for its worker, or Ctrl-C would kill it before it hands its jobs back.
        while self.process is not None and self.process.poll() is None:
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            log.info("stopping the local worker: running jobs save a checkpoint, go back to the queue and resume "
                     "at the next start (Ctrl-C again: exit at once)")
            stop_local_worker(self.process)

    def kill(self) -> None:
        """At once, without the hand-back (a second Ctrl-C): its trainers get their parent-death SIGTERM and
        save a checkpoint on their own, and the next start's worker, registering under the same name,
        re-queues the jobs. Left running, it would retry its reports against the stopped API for a minute."""
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def _make_server(config, on_first_exit, on_second_exit):  # type: ignore[no-untyped-def]
    """A uvicorn.Server whose first Ctrl-C/SIGTERM stops the local worker *before* the API goes away, so
    the worker can still hand its jobs back; a second signal exits at once, the worker with it."""
    import uvicorn

    class ServeServer(uvicorn.Server):
        stopping = False

        def handle_exit(self, sig: int, frame) -> None:  # type: ignore[no-untyped-def]
            if self.stopping:
                on_second_exit()
                return super().handle_exit(sig, frame)
            self.stopping = True

            def stop_then_exit() -> None:
                on_first_exit()
                super(ServeServer, self).handle_exit(sig, frame)

            threading.Thread(target=stop_then_exit, daemon=True).start()

    return ServeServer(config)
