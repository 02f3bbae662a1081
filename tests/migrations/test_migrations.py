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
from tests.database import migrate_to


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


ENQUEUE_JOB = "enqueue_job(text, text, jsonb, jsonb, smallint, timestamptz, float8, int, float8)"


@pytest.mark.parametrize(
    ("before", "after", "granted", "replaced", "kept"),
    [
        pytest.param(
            "0004_operations",
            "0005_claim_hints",
            ["claim_jobs(text, int, uuid, float8, text[], int[], int)"],
            ["claim_jobs(text, int, uuid, float8, text[], int[], int, int, float8, bigint)"],
            [],
            id="0005-claim_jobs",
        ),
        pytest.param(
            "0005_claim_hints",
            "0006_outbox_handoff",
            [
                "complete_messages(bigint[], uuid[], text[], boolean)",
                "outbox_keys_advance(text[])",
            ],
            [
                "complete_messages(bigint[], uuid[], text[], boolean, uuid, float8)",
                "outbox_keys_promote(text[], uuid, float8)",
            ],
            [
                "complete_messages(bigint[], uuid[], text[], boolean)",
                "outbox_keys_advance(text[])",
            ],
            id="0006-complete_messages",
        ),
        pytest.param(
            "0006_outbox_handoff",
            "0007_lean_claim",
            ["claim_jobs(text, int, uuid, float8, text[], int[], int, int, float8, bigint)"],
            [
                "claim_jobs(text, int, uuid, float8, text[], int[], int, int, float8, bigint, "
                "boolean)"
            ],
            ["claim_jobs(text, int, uuid, float8, text[], int[], int, int, float8, bigint)"],
            id="0007-claim_jobs",
        ),
        pytest.param(
            "0007_lean_claim",
            "0008_busy_workers",
            [ENQUEUE_JOB],
            [ENQUEUE_JOB],
            [ENQUEUE_JOB],
            id="0008-enqueue_job",
        ),
    ],
)
def test_a_revision_that_replaces_functions_keeps_who_may_run_them_both_ways(
    empty_dsn: str,
    before: str,
    after: str,
    granted: list[str],
    replaced: list[str],
    kept: list[str],
) -> None:
    """A revision that drops and creates functions (new parameters, new results) grants the
    new ones to the roles that could run the old ones, and its downgrade does the reverse."""
    role = f"t{uuid.uuid4().hex[:8]}_runner"

    def may_execute(function: str, grantee: str = role) -> bool | None:
        signature = f"pgqueue.{function}"
        with psycopg.connect(empty_dsn) as conn:
            if conn.execute("SELECT to_regprocedure(%s)", (signature,)).fetchone() == (None,):
                return None  # no such function
            row = conn.execute(
                "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (grantee, signature)
            ).fetchone()
            return None if row is None else bool(row[0])

    migrate_to(empty_dsn, before)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgqueue TO {}").format(sql.Identifier(role)))
        for function in granted:
            conn.execute(
                sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
                    sql.SQL(f"pgqueue.{function}"), sql.Identifier(role)
                )
            )
    try:
        assert all(may_execute(function) is True for function in granted)
        migrate_to(empty_dsn, after)
        assert migrate.current(empty_dsn) == after
        gone = [f for f in granted if f not in kept]
        assert [may_execute(f) for f in gone] == [None] * len(gone)
        assert all(may_execute(f) is True for f in (*replaced, *kept))
        # PUBLIC may not run them (0004 revoked functions from PUBLIC; these too).
        assert [may_execute(f, "public") for f in replaced] == [False] * len(replaced)
        migrate_to(empty_dsn, before, downgrade=True)
        assert [may_execute(f) for f in replaced if f not in granted] == [None] * len(
            [f for f in replaced if f not in granted]
        )
        assert all(may_execute(function) is True for function in granted)
    finally:
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
