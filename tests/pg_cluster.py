"""A throwaway PostgreSQL cluster for the server tests (Debian's `postgresql` package; `scripts/setup.sh
--test` installs it): initdb in a temp dir, one server on a free loopback port, trust auth, fsync off, and a
fresh database per test. As root, the server runs as the `postgres` user (PostgreSQL refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def available() -> bool:
    return _bin("initdb") is not None and _bin("pg_ctl") is not None


class Cluster:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="paratrain-pg-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres")
        data = f"{self.dir}/data"
        self._run([_bin("initdb"), "-D", data, "--auth=trust", "-U", "postgres", "--no-sync"])
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        self._run([_bin("pg_ctl"), "-D", data, "-o", options, "-l", f"{self.dir}/log", "-w", "start"])
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _run(self, argv: list[str]) -> None:
        if self.as_root:
            argv = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def new_database(self) -> str:
        import psycopg

        name = f"pt_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.url}/{name}"

    def stop(self) -> None:
        try:
            self._run([_bin("pg_ctl"), "-D", f"{self.dir}/data", "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
