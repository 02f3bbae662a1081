"""Fixtures giving each test a real PostgreSQL database; tests/database.py picks the server.

Session: ``pg_admin_dsn`` (superuser DSN), ``pg_server`` (the ``LocalPostgres`` we run, or None
when the server is external: tests that restart it skip then), ``template_dsn`` (a database
migrated once by ``pgqueue.migrate.upgrade``; sealed, do not connect to it).
Per test: ``dsn`` (a fresh copy of the template), ``empty_dsn`` (a fresh empty database),
``conn`` / ``aconn`` (psycopg connections to ``dsn``, autocommit off, never committed for you).
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from pgqueue.embedded import LocalPostgres
from tests import database

_SERVER_DESCRIPTION = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def _database_server(request: pytest.FixtureRequest) -> Iterator[database.DatabaseServer]:
    server = database.provision_server()
    try:
        request.config.stash[_SERVER_DESCRIPTION] = server.describe()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def pg_admin_dsn(_database_server: database.DatabaseServer) -> str:
    return _database_server.admin_dsn


@pytest.fixture(scope="session")
def pg_server(_database_server: database.DatabaseServer) -> LocalPostgres | None:
    return _database_server.local


def _migration_upgrade() -> Callable[..., object]:
    if importlib.util.find_spec("pgqueue.migrate") is None:
        pytest.skip("pgqueue.migrate does not exist yet: no migrated template database")
    from pgqueue import migrate

    upgrade: Callable[..., object] | None = getattr(migrate, "upgrade", None)
    if upgrade is None:
        pytest.skip("pgqueue.migrate.upgrade(dsn, schema=...) does not exist yet")
    return upgrade


@pytest.fixture(scope="session")
def template_dsn(pg_admin_dsn: str, pg_server: LocalPostgres | None) -> Iterator[str]:
    upgrade = _migration_upgrade()
    name = database.create_template(pg_admin_dsn, lambda dsn: upgrade(dsn, schema="pgqueue"))
    yield database.dsn_for(pg_admin_dsn, name)
    _revive(pg_server)
    database.drop_database(pg_admin_dsn, name)


def _revive(server: LocalPostgres | None) -> None:
    # A fault test that failed while the server was down must not fail every test after it.
    if server is not None and not server.is_running():
        server.start()


@pytest.fixture
def dsn(pg_admin_dsn: str, template_dsn: str, pg_server: LocalPostgres | None) -> Iterator[str]:
    name = database.unique_name("t")
    template = database.dbname_of(template_dsn)
    yield database.create_database(pg_admin_dsn, name, template=template)
    _revive(pg_server)
    database.drop_database(pg_admin_dsn, name)


@pytest.fixture
def empty_dsn(pg_admin_dsn: str, pg_server: LocalPostgres | None) -> Iterator[str]:
    name = database.unique_name("t")
    yield database.create_database(pg_admin_dsn, name)
    _revive(pg_server)
    database.drop_database(pg_admin_dsn, name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    connection = psycopg.connect(dsn, autocommit=False)
    yield connection
    connection.close()  # closing discards an open transaction: nothing is committed for you


@pytest_asyncio.fixture
async def aconn(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[Any, ...]]]:
    connection = await psycopg.AsyncConnection.connect(dsn, autocommit=False)
    yield connection
    await connection.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    description = config.stash.get(_SERVER_DESCRIPTION, None)
    if description is not None:
        terminalreporter.write_line(f"pgqueue: the database tests ran on {description}")
