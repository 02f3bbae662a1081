"""The one module that talks to the driver: sessions, named SQL, error translation, LISTEN."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import set_json_loads

from pgqueue.errors import (
    ConfigurationError,
    DatabaseError,
    PayloadTooLarge,
    PgQueueError,
    SchemaNotReady,
)
from pgqueue.names import queue_name, schema_name
from pgqueue.payload import safe_loads

STATEMENT_TIMEOUT_MS = 30_000
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000

# SQLSTATE classes after which the same operation may succeed on a new attempt.
_TRANSIENT_CLASSES = ("08", "53", "57", "40")


# ---------------------------------------------------------------- sessions and secrets


def redact(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (URL and key=value forms)."""
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.I)


def application_name(role: str) -> str:
    """``pgqueue-<role>@<host>:<pid>``, cut to PostgreSQL's 63 bytes; never the DSN."""
    return f"pgqueue-{role}@{socket.gethostname()}:{os.getpid()}"[:63]


def connect_kwargs(role: str) -> dict[str, Any]:
    """Keyword arguments for ``psycopg.connect`` that name the session."""
    return {"application_name": application_name(role), "connect_timeout": 10}


_SESSION_SETUP = (
    "SELECT set_config('statement_timeout', %s, false),"
    " set_config('idle_in_transaction_session_timeout', %s, false),"
    # Floats printed exactly whatever the role or database sets (claimed job times travel
    # as epoch seconds).
    " set_config('extra_float_digits', '3', false)"
)


def session_settings(
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    idle_timeout_ms: int = IDLE_IN_TRANSACTION_TIMEOUT_MS,
) -> tuple[str, tuple[str, str]]:
    """The statement (and its parameters) every pgqueue-owned session runs first."""
    return _SESSION_SETUP, (f"{statement_timeout_ms}ms", f"{idle_timeout_ms}ms")


def connect(dsn: str, role: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A pgqueue-owned sync session: named, with timeouts, errors translated."""
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, **connect_kwargs(role))
        set_json_loads(safe_loads, conn)
        query, params = session_settings()
        conn.execute(query, params)
        if not autocommit:
            conn.commit()
        return conn
    except psycopg.Error as exc:
        raise translate_error(exc) from None


async def connect_async(
    dsn: str, role: str, *, autocommit: bool = True
) -> psycopg.AsyncConnection[Any]:
    """The async twin of :func:`connect`."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=autocommit, **connect_kwargs(role)
        )
        # A corrupted row must dead-letter its job, not crash the process that claimed it.
        set_json_loads(safe_loads, conn)
        query, params = session_settings()
        await conn.execute(query, params)
        if not autocommit:
            await conn.commit()
        return conn
    except psycopg.Error as exc:
        raise translate_error(exc) from None


# ---------------------------------------------------------------- errors


def translate_error(exc: BaseException) -> PgQueueError:
    """Map a driver error to pgqueue's tree by SQLSTATE and constraint, never by message text."""
    if isinstance(exc, PgQueueError):
        return exc
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(
        exc, (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName, pg_errors.UndefinedFunction)
    ) or sqlstate in ("42P01", "3F000", "42883"):
        # A missing function is a schema older than this code (or never migrated).
        return SchemaNotReady(
            "the pgqueue schema is missing, incomplete or older than this pgqueue in this "
            "database: run `pgqueue migrate` (or pgqueue.migrate.upgrade(dsn)) first"
        )
    if isinstance(exc, psycopg.ProgrammingError) and sqlstate is None:
        # libpq could not parse the DSN; its message may quote a piece of it (a password).
        return ConfigurationError(
            "the DSN does not parse: use postgresql://user:password@host:port/dbname or "
            "key=value pairs (host=... dbname=...); check --dsn / PGQUEUE_DSN"
        )
    pgconn = getattr(exc, "pgconn", None)
    if (
        isinstance(exc, psycopg.OperationalError)
        and sqlstate is None
        and pgconn is not None
        and getattr(pgconn, "used_password", False)
    ):
        # The server was reached and took a password, then refused the session: retrying
        # cannot help. (libpq reports no SQLSTATE for connection failures.)
        return ConfigurationError(
            "PostgreSQL refused the credentials in the DSN: check the user and password "
            "in --dsn / PGQUEUE_DSN"
        )
    if isinstance(exc, psycopg.OperationalError) and sqlstate is None:
        # libpq's message names host and port but never the password; keep its first line.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
        return DatabaseError(
            f"cannot reach PostgreSQL: {redact(first_line)}", is_transient=True, sqlstate=None
        )
    constraint = getattr(getattr(exc, "diag", None), "constraint_name", None)
    if sqlstate == "23514" and constraint in ("jobs_args_size_check", "outbox_payload_size_check"):
        return PayloadTooLarge(
            "the payload is larger than the database allows (256 KiB stored, constraint "
            f"{constraint}): store large data elsewhere and enqueue a reference to it"
        )
    if sqlstate == "28P01" or sqlstate == "28000":
        return ConfigurationError(
            "PostgreSQL refused the credentials in the DSN: check the user and password "
            "in --dsn / PGQUEUE_DSN"
        )
    if sqlstate == "3D000":
        return ConfigurationError(
            "the database named in the DSN does not exist: create it or fix --dsn / PGQUEUE_DSN"
        )
    transient = sqlstate is not None and sqlstate[:2] in _TRANSIENT_CLASSES
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        transient = True
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseError(redact(message), is_transient=transient, sqlstate=sqlstate)


def is_connection_error(exc: BaseException) -> bool:
    """True when the session itself is gone (not just one statement failing)."""
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    return (
        isinstance(exc, DatabaseError)
        and exc.is_transient
        and (exc.sqlstate or "08")[:2]
        in (
            "08",
            "57",
        )
    )


# ---------------------------------------------------------------- named SQL


@dataclass(frozen=True)
class Query:
    """A named query rendered for one schema; ``text`` is what the driver prepares."""

    name: str
    text: str


def _parse_sql_file(content: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in content.splitlines():
        match = re.match(r"--\s*name:\s*([a-z_]+)\s*$", line)
        if match:
            if name is not None:
                blocks[name] = "\n".join(lines).strip()
            name, lines = match.group(1), []
        elif name is not None and not line.startswith("--"):
            lines.append(line)
    if name is not None:
        blocks[name] = "\n".join(lines).strip()
    return blocks


@lru_cache(maxsize=1)
def _raw_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for entry in resources.files("pgqueue.sql").iterdir():
        if entry.name.endswith(".sql"):
            for name, text in _parse_sql_file(entry.read_text("utf-8")).items():
                if name in queries:
                    raise RuntimeError(f"query {name!r} is defined twice")
                queries[name] = text
    return queries


@lru_cache(maxsize=32)
def queries(schema: str) -> Mapping[str, Query]:
    """All named queries rendered for ``schema`` (allow-listed, then quoted)."""
    identifier = sql.Identifier(schema_name(schema))
    rendered = {}
    for name, text in _raw_queries().items():
        composed = sql.SQL(text).format(schema=identifier)  # type: ignore[arg-type]
        rendered[name] = Query(name, composed.as_string(None))
    return rendered


def channel(schema: str, queue: str) -> str:
    """The LISTEN/NOTIFY channel of one queue; a hash keeps it under 63 bytes."""
    digest = hashlib.md5(
        f"{schema_name(schema)}.{queue_name(queue)}".encode(), usedforsecurity=False
    ).hexdigest()
    return f"pgqueue_{digest[:24]}"


def listen_statement(name: str) -> sql.Composed:
    """``LISTEN "<channel>"`` with the channel quoted as an identifier."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(name))


# ---------------------------------------------------------------- caller connections


def _sqlalchemy_driver(conn: Any) -> Any:
    """The psycopg connection under a SQLAlchemy Connection or Session, or None."""
    module = type(conn).__module__
    if not module.startswith("sqlalchemy"):
        return None
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session

    if isinstance(conn, Session):
        conn = conn.connection()
    if isinstance(conn, SAConnection):
        driver = conn.connection.driver_connection
        if isinstance(driver, psycopg.Connection):
            return driver
        raise TypeError(
            "pgqueue needs SQLAlchemy's psycopg 3 driver: create the engine with a "
            "'postgresql+psycopg://' URL (found driver "
            f"{type(driver).__module__}.{type(driver).__name__})"
        )
    return None


def sync_connection(conn: Any) -> psycopg.Connection[Any]:
    """The psycopg connection to run on, from a psycopg or SQLAlchemy sync object."""
    if isinstance(conn, psycopg.Connection):
        return conn
    driver = _sqlalchemy_driver(conn)
    if driver is not None:
        return driver  # type: ignore[no-any-return]
    if isinstance(conn, psycopg.AsyncConnection) or type(conn).__name__.startswith("Async"):
        raise TypeError(f"{type(conn).__name__} is async: use the *_async function")
    raise TypeError(
        "conn must be a psycopg Connection or a SQLAlchemy Connection/Session, "
        f"got {type(conn).__module__}.{type(conn).__name__}"
    )


async def async_connection(conn: Any) -> psycopg.AsyncConnection[Any]:
    """The psycopg async connection under a psycopg or SQLAlchemy async object."""
    if isinstance(conn, psycopg.AsyncConnection):
        return conn
    module = type(conn).__module__
    if module.startswith("sqlalchemy"):
        from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
        from sqlalchemy.ext.asyncio import AsyncSession

        if isinstance(conn, AsyncSession):
            conn = await conn.connection()
        if isinstance(conn, SAAsyncConnection):
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            if isinstance(driver, psycopg.AsyncConnection):
                return driver
            raise TypeError(
                "pgqueue needs SQLAlchemy's psycopg 3 async driver: create the engine with "
                "a 'postgresql+psycopg://' URL and create_async_engine"
            )
    if isinstance(conn, psycopg.Connection):
        raise TypeError("conn is a sync connection: use the function without _async")
    raise TypeError(
        "conn must be a psycopg AsyncConnection or a SQLAlchemy AsyncConnection/AsyncSession, "
        f"got {module}.{type(conn).__name__}"
    )


def run_sync(
    conn: psycopg.Connection[Any],
    query: Query,
    params: Mapping[str, Any],
    *,
    binary: bool = False,
) -> list[Any]:
    """Run one named query on a caller's connection and return its rows as dicts.

    ``binary`` asks for binary results: cheaper to load for large arrays (bulk ids).
    """
    try:
        with conn.cursor(row_factory=dict_row, binary=binary) as cursor:
            cursor.execute(query.text, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []
    except psycopg.Error as exc:
        raise translate_error(exc) from exc


async def run_async(
    conn: psycopg.AsyncConnection[Any],
    query: Query,
    params: Mapping[str, Any],
    *,
    binary: bool = False,
) -> list[Any]:
    """The async twin of :func:`run_sync`."""
    try:
        async with conn.cursor(row_factory=dict_row, binary=binary) as cursor:
            await cursor.execute(query.text, params)  # type: ignore[arg-type]
            return await cursor.fetchall() if cursor.description else []
    except psycopg.Error as exc:
        raise translate_error(exc) from exc


def first_row_sync(
    conn: psycopg.Connection[Any], query: Query, params: Mapping[str, Any]
) -> tuple[Any, ...] | None:
    """The first row of one named query, as a tuple: the single-job enqueue's short path
    (no dict rows, no list), paid on the caller's request path. Tuples whatever row factory
    the caller's connection has."""
    try:
        with conn.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(query.text, params)  # type: ignore[arg-type]
            return cursor.fetchone()
    except psycopg.Error as exc:
        raise translate_error(exc) from exc


async def first_row_async(
    conn: psycopg.AsyncConnection[Any], query: Query, params: Mapping[str, Any]
) -> tuple[Any, ...] | None:
    """The async twin of :func:`first_row_sync`."""
    try:
        async with conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(query.text, params)  # type: ignore[arg-type]
            return await cursor.fetchone()
    except psycopg.Error as exc:
        raise translate_error(exc) from exc


def copy_sync(conn: psycopg.Connection[Any], query: Query, chunks: Iterable[str]) -> None:
    """COPY text-format ``chunks`` on a caller's connection, each sent as it is produced."""
    try:
        with conn.cursor() as cursor, cursor.copy(query.text) as copy:  # type: ignore[arg-type]
            for chunk in chunks:
                copy.write(chunk)
    except psycopg.Error as exc:
        raise translate_error(exc) from exc


async def copy_async(
    conn: psycopg.AsyncConnection[Any], query: Query, chunks: Iterable[str]
) -> None:
    """The async twin of :func:`copy_sync`."""
    try:
        async with conn.cursor() as cursor, cursor.copy(query.text) as copy:  # type: ignore[arg-type]
            for chunk in chunks:
                await copy.write(chunk)
    except psycopg.Error as exc:
        raise translate_error(exc) from exc


# A savepoint inside the caller's transaction: an error inside takes back only what was
# written inside, and the caller's transaction stays usable. On a connection in autocommit
# the block is a transaction of its own instead.


@contextmanager
def savepoint_sync(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Run the block so that an error inside undoes only the block's own writes."""
    try:
        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            with conn.transaction():
                yield
            return
        conn.execute("SAVEPOINT pgqueue_bulk")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO SAVEPOINT pgqueue_bulk")
            conn.execute("RELEASE SAVEPOINT pgqueue_bulk")
            raise
        conn.execute("RELEASE SAVEPOINT pgqueue_bulk")
    except psycopg.Error as exc:
        raise translate_error(exc) from exc


@asynccontextmanager
async def savepoint_async(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """The async twin of :func:`savepoint_sync`."""
    try:
        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            async with conn.transaction():
                yield
            return
        await conn.execute("SAVEPOINT pgqueue_bulk")
        try:
            yield
        except BaseException:
            await conn.execute("ROLLBACK TO SAVEPOINT pgqueue_bulk")
            await conn.execute("RELEASE SAVEPOINT pgqueue_bulk")
            raise
        await conn.execute("RELEASE SAVEPOINT pgqueue_bulk")
    except psycopg.Error as exc:
        raise translate_error(exc) from exc
