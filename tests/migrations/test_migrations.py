"""Migrations: own version table, idempotent and concurrent upgrades, no drift, review SQL."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, pool

import pgqueue
from pgqueue import migrate
from pgqueue.schema import build_metadata


def _engine(dsn: str) -> Any:
    return create_engine("postgresql+psycopg://" + dsn.split("://", 1)[1], poolclass=pool.NullPool)


def test_upgrade_is_idempotent_and_uses_its_own_version_table(empty_dsn: str) -> None:
    assert migrate.current(empty_dsn) is None
    migrate.upgrade(empty_dsn)
    migrate.upgrade(empty_dsn)
    assert migrate.current(empty_dsn) == migrate.head_revision()
    with psycopg.connect(empty_dsn) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT schemaname || '.' || tablename FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
            )
        }
    assert "pgqueue.schema_version" in tables
    assert not any(t.endswith("alembic_version") for t in tables)


def test_models_and_migrations_do_not_drift(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn)
    engine = _engine(empty_dsn)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_schemas": True,
                "include_name": lambda name, kind, _parent: kind != "schema" or name == "pgqueue",
                "version_table": "schema_version",
                "version_table_schema": "pgqueue",
            },
        )
        diff = compare_metadata(context, build_metadata("pgqueue"))
    engine.dispose()
    assert diff == []


def test_concurrent_upgrades_serialize(empty_dsn: str) -> None:
    # Separate processes, as in a rollout of several pods (Alembic's context is per process).
    code = "import sys; from pgqueue import migrate; migrate.upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, empty_dsn], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [(p.wait(60), p.stderr.read() if p.stderr else "") for p in processes]
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    assert migrate.current(empty_dsn) == migrate.head_revision()


def test_a_database_newer_than_the_code_is_refused(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn) as conn:
        conn.execute("UPDATE pgqueue.schema_version SET version_num = '9999_future'")
        conn.commit()
    with pytest.raises(pgqueue.SchemaNotReady, match="newer than this pgqueue"):
        migrate.upgrade(empty_dsn)


def test_other_schema_name_is_fully_separate(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn, schema="jobs_b")
    assert migrate.current(empty_dsn, schema="jobs_b") == migrate.head_revision()
    assert migrate.current(empty_dsn) is None
    with psycopg.connect(empty_dsn) as conn:
        job_id = pgqueue.enqueue(conn, "t", {}, schema="jobs_b")
        conn.commit()
        row = conn.execute("SELECT id FROM jobs_b.jobs").fetchone()
    assert row == (job_id,)


def test_enqueue_before_migrating_says_what_to_run(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn) as conn:
        with pytest.raises(pgqueue.SchemaNotReady, match="pgqueue migrate"):
            pgqueue.enqueue(conn, "t", {})


def test_review_sql_is_printed_without_a_database() -> None:
    text = migrate.upgrade_sql("pgqueue")
    assert "CREATE TABLE pgqueue.jobs" in text
    assert "CREATE UNIQUE INDEX jobs_unique_key_idx" in text
    assert "pg_advisory_xact_lock" in text
    assert "schema_version" in text and "alembic_version" not in text


def test_host_application_env_can_run_pgqueue_revisions(empty_dsn: str) -> None:
    engine = _engine(empty_dsn)
    with engine.connect() as connection:
        migrate.upgrade_connection(connection, schema="pgqueue")
    engine.dispose()
    assert migrate.current(empty_dsn) == migrate.head_revision()
