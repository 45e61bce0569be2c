"""A real PostgreSQL 15 for the tests: `initdb` and `pg_ctl` in a temp dir, as the `postgres` user
(initdb refuses root), on 127.0.0.1 and a free port; one fresh database per test."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cove.devserver import free_port

BIN = Path(os.environ.get("COVE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "postgres"  # the system user of Debian's package, and the cluster's superuser


def missing() -> str | None:
    """Why no PostgreSQL can be started here, or None."""
    if not (BIN / "initdb").exists() or not (BIN / "pg_ctl").exists():
        return f"PostgreSQL 15 is not installed (no {BIN}/initdb): apt-get install postgresql (setup.sh does)"
    if shutil.which("runuser") is None:
        return "runuser (util-linux) is missing: it runs initdb as the postgres user"
    try:
        import pwd

        pwd.getpwnam(USER)
    except KeyError:
        return f"no system user {USER!r} to run PostgreSQL as (apt-get install postgresql creates it)"
    return None


class Postgres:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cove-test-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self._names = itertools.count()
        self.pid = 0  # the postmaster's, once started

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", USER, "--", *args], check=True, capture_output=True, timeout=60, cwd=self.dir
        )

    def start(self) -> None:
        shutil.chown(self.dir, USER, USER)
        try:
            self._as_postgres(
                str(BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
            # fsync off: a test cluster need not survive a power cut, and it is much faster on this disk.
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
            self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                              "-o", options, "start")  # fmt: skip
        except subprocess.CalledProcessError as e:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr.decode()}\n{log}") from e
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def processes(self) -> list[int]:
        """The server's processes still alive: its postmaster and every backend it started."""
        alive = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z" and self.pid in (int(proc.name), int(ppid)):  # a zombie is gone, unreaped
                alive.append(int(proc.name))
        return alive

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
