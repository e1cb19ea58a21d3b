"""A throwaway PostgreSQL for tests: initdb into a temp dir, start with pg_ctl, stop and delete.

The cluster has ``wal_level=logical``, listens on 127.0.0.1 on a free port (plus a unix socket in
its temp dir) and trusts every local connection. PostgreSQL refuses to run as root, so when the
tests run as root every server command runs as the ``postgres`` OS user (``runuser``), and the
temp dir is handed to that user.

Use :func:`postgres_fixture` to make a session-scoped pytest fixture::

    postgres = postgres_fixture()          # in a conftest.py

    def test_x(postgres: PostgresServer) -> None:
        dsn = postgres.create_database()
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import free_port

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir", "postgres_fixture"]

# Small, fast, replication-ready settings. fsync is off: the data is thrown away anyway. Commits stay
# synchronous: logical decoding only reads flushed WAL, so async commits would add latency.
DEFAULT_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "40",
    "max_wal_senders": "40",
    "max_connections": "100",
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    # Not UTC on purpose: Tidings must render UTC whatever the server's zone is.
    "timezone": "'Europe/Paris'",
    "log_min_messages": "warning",
}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries on this machine, or the cluster failed to start."""


def find_bindir() -> Path:
    """Directory holding initdb/pg_ctl: ``pg_config --bindir``, else the newest /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name.split(".")[0]),
        reverse=True,
    )
    candidates.extend(Path(p) for p in versions)
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")


class PostgresServer:
    """One throwaway cluster. Start with :meth:`start`; :meth:`destroy` stops it and deletes its files.

    Args:
        settings: extra ``postgresql.conf`` settings (added to :data:`DEFAULT_SETTINGS`).
    """

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bindir = find_bindir()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="tidings-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "server.log"
        self._run_as: str | None = "postgres" if os.geteuid() == 0 else None
        self._db_counter = itertools.count(1)

    # -- commands -----------------------------------------------------------------------------

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = list(args)
        if self._run_as:
            argv = ["runuser", "-u", self._run_as, "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise PostgresUnavailable(
                f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}"
            )
        return proc

    def start(self) -> PostgresServer:
        """initdb (first time only) and start the server; returns self."""
        if not self.datadir.exists():
            self.sockdir.mkdir(parents=True)
            if self._run_as:
                pw = pwd.getpwnam(self._run_as)
                for path in (self.root, self.sockdir):
                    os.chown(path, pw.pw_uid, pw.pw_gid)
            self._cmd(
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            conf = dict(self.settings)
            conf.update(
                port=str(self.port),
                listen_addresses="'127.0.0.1'",
                unix_socket_directories=f"'{self.sockdir}'",
            )
            with open(self.datadir / "postgresql.conf", "a") as f:
                f.write("\n# tidings tests\n")
                f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        self._cmd(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` disconnects clients; ``immediate`` is a crash)."""
        self._cmd(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "stop",
            check=False,
        )

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port: every client connection is cut."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server and delete its files."""
        if self.datadir.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- connections --------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A libpq URL for *dbname* over TCP."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", user: str = "postgres") -> Any:
        """An autocommit psycopg2 connection (autocommit so nothing holds a snapshot open)."""
        import psycopg2

        conn = psycopg2.connect(self.dsn(dbname, user))
        conn.autocommit = True
        return conn

    def execute(self, sql: str, params: Any = None, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement in its own connection; returns the rows (empty for commands)."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database (isolates publications and tables between tests); returns its DSN."""
        name = f"{prefix}_{os.getpid()}_{next(self._db_counter)}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_inactive_slots(self) -> None:
        """Drop replication slots nobody streams from (they pin WAL)."""
        self.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")


def postgres_fixture(scope: Any = "session", settings: dict[str, str] | None = None) -> Callable[..., Any]:
    """Make a pytest fixture yielding a started :class:`PostgresServer`, destroyed at the end.

    Assign the result to a name in a conftest.py; that name becomes the fixture's name.
    """

    @pytest.fixture(scope=scope)
    def _postgres() -> Iterator[PostgresServer]:
        server = PostgresServer(settings)
        try:
            server.start()
            yield server
        finally:
            server.destroy()

    return _postgres
