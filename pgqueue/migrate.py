"""Schema migrations over Alembic: upgrade, current revision, and the SQL for review."""

from __future__ import annotations

import io
from importlib import resources
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, pool
from sqlalchemy import inspect as sa_inspect

from pgqueue.db import connect_kwargs, translate_error
from pgqueue.errors import SchemaNotReady
from pgqueue.names import schema_name
from pgqueue.schema import DEFAULT_SCHEMA, VERSION_TABLE


def _config(schema: str) -> Config:
    config = Config()
    location = resources.files("pgqueue.migrations")
    config.set_main_option("script_location", str(location))
    config.attributes["pgqueue_schema"] = schema_name(schema)
    return config


def head_revision() -> str:
    """The newest revision this version of pgqueue knows."""
    head = ScriptDirectory.from_config(_config(DEFAULT_SCHEMA)).get_current_head()
    assert head is not None
    return head


def _engine(dsn: str) -> Any:
    return create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn, **connect_kwargs("pgqueue-migrate")),
        poolclass=pool.NullPool,
    )


def _current_on(connection: Connection, schema: str) -> str | None:
    if not sa_inspect(connection).has_table(VERSION_TABLE, schema=schema):
        return None
    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
    )
    return context.get_current_revision()


def _refuse_newer(connection: Connection, schema: str) -> None:
    current = _current_on(connection, schema)
    if current is None:
        return
    script = ScriptDirectory.from_config(_config(schema))
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        raise SchemaNotReady(
            f"schema {schema!r} is at revision {current!r}, newer than this pgqueue knows "
            f"(head {head_revision()!r}): upgrade the pgqueue package instead of migrating"
        )


def upgrade_connection(connection: Connection, schema: str = DEFAULT_SCHEMA) -> None:
    """Upgrade on a SQLAlchemy ``connection`` (e.g. from a host app's Alembic ``env.py``).

    The caller owns the connection; its transaction is committed by Alembic's block.
    Example, in the host's ``run_migrations_online``::

        with engine.connect() as connection:
            pgqueue.migrate.upgrade_connection(connection)
            context.configure(connection=connection, ...)
    """
    _refuse_newer(connection, schema)
    config = _config(schema)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    if connection.in_transaction():
        connection.commit()


def upgrade(dsn: str, schema: str = DEFAULT_SCHEMA) -> None:
    """Bring ``schema`` to the newest revision; safe to run concurrently and repeatedly."""
    schema = schema_name(schema)
    engine = _engine(dsn)
    try:
        with engine.connect() as connection:
            upgrade_connection(connection, schema)
    except psycopg.Error as exc:
        raise translate_error(exc) from exc
    except Exception as exc:
        cause = exc.__cause__ or getattr(exc, "orig", None)
        if isinstance(cause, psycopg.Error):
            raise translate_error(cause) from exc
        raise
    finally:
        engine.dispose()


def current(dsn: str, schema: str = DEFAULT_SCHEMA) -> str | None:
    """The revision the database is at, or None when pgqueue was never migrated there."""
    schema = schema_name(schema)
    engine = _engine(dsn)
    try:
        with engine.connect() as connection:
            return _current_on(connection, schema_name(schema))
    except Exception as exc:
        cause = exc if isinstance(exc, psycopg.Error) else getattr(exc, "orig", None)
        if isinstance(cause, psycopg.Error):
            raise translate_error(cause) from exc
        raise
    finally:
        engine.dispose()


def upgrade_sql(schema: str = DEFAULT_SCHEMA, *, since: str | None = None) -> str:
    """The SQL that ``upgrade`` would run, for a DBA to review (no database needed)."""
    config = _config(schema)
    buffer = io.StringIO()
    config.output_buffer = buffer
    target = f"{since}:head" if since else "head"
    command.upgrade(config, target, sql=True)
    return buffer.getvalue()
