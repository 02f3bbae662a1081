"""Alembic environment for pgqueue's own revisions, in its own schema and version table."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from pgqueue.names import schema_name
from pgqueue.schema import VERSION_TABLE, build_metadata

config = context.config
schema = schema_name(config.attributes.get("pgqueue_schema") or "pgqueue")
# Concurrent `pgqueue migrate` runs (a rollout starting ten pods) queue up on this lock
# instead of racing to create the same objects.
LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('pgqueue.migrate'), hashtext(:schema))"


def _configure(**options: object) -> None:
    context.configure(
        target_metadata=build_metadata(schema),
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        include_schemas=True,
        include_name=lambda name, type_, _parent: type_ != "schema" or name == schema,
        transaction_per_migration=False,
        **options,
    )


def run_offline() -> None:
    _configure(dialect_name="postgresql", literal_binds=True, transactional_ddl=True)
    with context.begin_transaction():
        context.execute(
            f"SELECT pg_advisory_xact_lock(hashtext('pgqueue.migrate'), hashtext('{schema}'))"
        )
        context.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        engine = create_engine(url, poolclass=pool.NullPool)
        with engine.connect() as owned:
            _run_on(owned)
        engine.dispose()
    else:
        _run_on(connection)


def _run_on(connection: object) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.execute(text(LOCK_SQL).bindparams(schema=schema))
        context.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
