"""Settings read from arguments and the environment: DSN and schema."""

from __future__ import annotations

import os

from pgqueue.errors import ConfigurationError
from pgqueue.names import schema_name
from pgqueue.schema import DEFAULT_SCHEMA


def resolve_schema(schema: str | None = None) -> str:
    """``schema``, else ``PGQUEUE_SCHEMA``, else ``pgqueue``; always allow-listed."""
    return schema_name(schema or os.environ.get("PGQUEUE_SCHEMA") or DEFAULT_SCHEMA)


def find_dsn(dsn: str | None = None) -> str | None:
    """``dsn``, else ``PGQUEUE_DSN``, else ``DATABASE_URL``, else None."""
    return dsn or os.environ.get("PGQUEUE_DSN") or os.environ.get("DATABASE_URL") or None


def resolve_dsn(dsn: str | None = None) -> str:
    """Like :func:`find_dsn` but a missing DSN is a configuration error."""
    found = find_dsn(dsn)
    if not found:
        raise ConfigurationError(
            "no database given: pass --dsn, or set PGQUEUE_DSN (or DATABASE_URL); "
            "`pgqueue dev` starts a local PostgreSQL and prints a DSN"
        )
    return found
