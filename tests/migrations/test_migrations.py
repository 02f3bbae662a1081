"""Migrations: own version table, idempotent and concurrent upgrades, no drift, review SQL."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from psycopg import sql
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


def test_the_claim_hints_revision_keeps_who_may_claim_both_ways(empty_dsn: str) -> None:
    """0005 replaces claim_jobs (new parameters): the roles that could run it still can."""
    from alembic import command

    role = f"t{uuid.uuid4().hex[:8]}_claimer"
    old = "pgqueue.claim_jobs(text, int, uuid, float8, text[], int[], int)"
    new = "pgqueue.claim_jobs(text, int, uuid, float8, text[], int[], int, int, float8, bigint)"

    def migrate_to(revision: str, downgrade: bool = False) -> None:
        engine = _engine(empty_dsn)
        try:
            with engine.connect() as connection:
                config = migrate._config("pgqueue")
                config.attributes["connection"] = connection
                (command.downgrade if downgrade else command.upgrade)(config, revision)
                connection.commit()
        finally:
            engine.dispose()

    def may_execute(signature: str) -> bool | None:
        with psycopg.connect(empty_dsn) as conn:
            if conn.execute("SELECT to_regprocedure(%s)", (signature,)).fetchone() == (None,):
                return None  # no such function
            row = conn.execute(
                "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, signature)
            ).fetchone()
            return None if row is None else bool(row[0])

    migrate_to("0004_operations")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgqueue TO {}").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(old), sql.Identifier(role))
        )
    try:
        assert may_execute(old) is True
        migrate.upgrade(empty_dsn)
        assert migrate.current(empty_dsn) == migrate.head_revision() == "0005_claim_hints"
        assert may_execute(old) is None and may_execute(new) is True
        with psycopg.connect(empty_dsn) as conn:
            # PUBLIC may not run it (0004 revoked functions from PUBLIC; this one too).
            row = conn.execute(
                "SELECT has_function_privilege('public', %s, 'EXECUTE')", (new,)
            ).fetchone()
            assert row == (False,)
        migrate_to("0004_operations", downgrade=True)
        assert may_execute(new) is None and may_execute(old) is True
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
