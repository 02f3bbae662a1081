"""Least privilege and metrics against real PostgreSQL: what each role can and cannot do after
``grants_sql``, a Worker and a Relay running as their roles, and the Prometheus endpoint.

Each test makes its own four roles (a random prefix) and drops them at the end, so a shared
server (PGQUEUE_TEST_DSN) keeps no trace. The admin session becomes a role with SET ROLE, or
a worker's sessions with the libpq option ``-c role=...``.
"""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgqueue
from pgqueue.roles import RoleNames, grants_sql
from pgqueue.sinks import Message
from pgqueue.sinks.local import CallableSink
from tests.integration.worker_runner import enqueue, jobs_left, running_worker, scalar, wait_until

VIEWS = (
    "queue_stats",
    "running_jobs",
    "dead_letters",
    "blocked_keys",
    "outbox_backlog",
    "workers",
    "health",
)
TABLES = ("jobs", "dead_jobs", "queues", "outbox", "outbox_dead", "audit_log", "job_events")
FAST = pgqueue.RetryPolicy(base_seconds=0.05, max_seconds=0.1)


@pytest.fixture
def roles(dsn: str) -> Iterator[RoleNames]:
    names = RoleNames.for_schema("pgqueue", prefix=f"t{uuid.uuid4().hex[:8]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(grants_sql("pgqueue", names))
    yield names
    drop_roles(dsn, names)


def drop_roles(dsn: str, names: RoleNames) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for role in (names.producer, names.worker, names.relay, names.reader):
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def as_role(dsn: str, role: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn)
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    conn.commit()
    return conn


def denied(conn: psycopg.Connection[Any], statement: str) -> bool:
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        return True
    conn.rollback()
    return False


def role_dsn(dsn: str, role: str) -> str:
    """Every session of this DSN runs as ``role`` (the login role must be a member)."""
    return make_conninfo(dsn, options=f"-c role={role}")


# ---------------------------------------------------------------- roles


def test_producer_enqueues_and_publishes_but_cannot_read_or_change_jobs(
    dsn: str, roles: RoleNames
) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        pgqueue.configure_queue(admin, "email", max_depth=100)
    with as_role(dsn, roles.producer) as conn:
        plain = pgqueue.enqueue(conn, "send", {"to": "a@example.com"}, queue="email")
        keyed = pgqueue.enqueue(conn, "send", {}, queue="email", ordering_key="k", delay=5)
        unique = pgqueue.enqueue(conn, "send", {}, queue="email", unique_key="u-1")
        assert pgqueue.enqueue(conn, "send", {}, queue="email", unique_key="u-1") == unique
        message = pgqueue.publish(conn, "orders", {"id": 1}, key="order-1")
        conn.commit()
        for table in TABLES:
            assert denied(conn, f"SELECT * FROM pgqueue.{table}"), table
        assert denied(conn, "UPDATE pgqueue.jobs SET priority = 5")
        assert denied(conn, "DELETE FROM pgqueue.jobs")
        assert denied(conn, "INSERT INTO pgqueue.jobs (queue, task) VALUES ('email', 'x')")
        for view in VIEWS:
            assert denied(conn, f"SELECT * FROM pgqueue.{view}"), view
        assert denied(
            conn,
            "SELECT * FROM pgqueue.claim_jobs('email', 1, gen_random_uuid(), 30, '{}', '{}', 1)",
        )
        assert denied(conn, "SELECT * FROM pgqueue.requeue_dead_jobs('{1}')")
        assert denied(conn, "SELECT * FROM pgqueue.cancel_jobs('{1}', 'x')")
    found = scalar(dsn, "SELECT array_agg(id ORDER BY id) FROM pgqueue.jobs WHERE queue = 'email'")
    assert found == sorted([plain, keyed, unique])
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.outbox WHERE message_id = %s", (message,)) == 1


def test_reader_reads_the_views_and_nothing_else(dsn: str, roles: RoleNames) -> None:
    enqueue(dsn, "send", {}, queue="email")
    with as_role(dsn, roles.reader) as conn:
        for view in VIEWS:
            conn.execute(f"SELECT * FROM pgqueue.{view}").fetchall()
        (stats,) = conn.execute("SELECT queue, ready FROM pgqueue.queue_stats").fetchall()
        assert stats == ("email", 1)
        for table in TABLES:
            assert denied(conn, f"SELECT * FROM pgqueue.{table}"), table
        with pytest.raises(pgqueue.DatabaseError) as error:
            pgqueue.enqueue(conn, "send", {}, queue="email")
        assert error.value.sqlstate == "42501"
        conn.rollback()
        assert denied(conn, "SELECT * FROM pgqueue.purge_dead_jobs('{1}')")
        # queue_stats estimates deep counts through a definer function the reader may call;
        # it explains fixed statements only.
        (estimate,) = conn.execute("SELECT pgqueue.estimated_jobs('email', 'ready')").fetchone()
        assert estimate >= 0
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT pgqueue.estimated_jobs('email', 'DROP TABLE x')")
        conn.rollback()


def test_no_function_is_executable_by_public_and_definers_pin_search_path(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        public = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc AS p"
            " JOIN pg_namespace AS n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'pgqueue' AND (p.proacl IS NULL OR EXISTS ("
            "   SELECT 1 FROM aclexplode(p.proacl) AS a"
            "   WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))"
        ).fetchall()
        definers = conn.execute(
            "SELECT p.proname, p.proconfig FROM pg_proc AS p"
            " JOIN pg_namespace AS n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'pgqueue' AND p.prosecdef ORDER BY 1"
        ).fetchall()
    assert public == []
    assert [name for name, _ in definers] == [
        "enqueue_job",
        "enqueue_jobs",
        "estimated_jobs",
        "publish_messages",
    ]
    assert all(
        any(setting.startswith("search_path=") for setting in config or [])
        for _, config in definers
    )


def test_a_worker_runs_jobs_as_the_worker_role_without_permission_errors(
    dsn: str, roles: RoleNames, caplog: pytest.LogCaptureFixture
) -> None:
    app = pgqueue.App()
    ran: list[str] = []

    @app.task(max_attempts=2, retry=FAST)
    def work(job: pgqueue.Job, mode: str) -> None:
        if mode == "flaky" and job.attempt == 1:
            raise RuntimeError("once")
        if mode == "broken":
            raise pgqueue.NonRetryable("never")
        ran.append(mode)

    for mode in ("fine", "flaky", "broken"):
        enqueue(dsn, "work", {"mode": mode})
    with psycopg.connect(dsn) as conn:
        pgqueue.enqueue(conn, "work", {"mode": "first"}, ordering_key="k")
        pgqueue.enqueue(conn, "work", {"mode": "second"}, ordering_key="k")
        conn.commit()
    caplog.set_level(logging.INFO, logger="pgqueue")
    worker_dsn = role_dsn(dsn, roles.worker)
    with psycopg.connect(worker_dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (roles.worker,)
        assert denied(conn, "SELECT * FROM pgqueue.outbox")
    with running_worker(app, worker_dsn, heartbeat_seconds=0.2, rescue_seconds=0.2):
        wait_until(lambda: jobs_left(dsn) == 0)
    assert sorted(ran) == ["fine", "first", "flaky", "second"]
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.dead_jobs WHERE reason = 'non_retryable'") == 1
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [p for p in problems if "permission denied" in p or "42501" in p], problems
    with as_role(dsn, roles.worker) as conn:
        assert denied(conn, "UPDATE pgqueue.audit_log SET count = 0")


def test_a_relay_delivers_as_the_relay_role(dsn: str, roles: RoleNames) -> None:
    from tests.integration.test_outbox import relay_running

    delivered: list[str] = []
    app = pgqueue.App()
    app.route("orders.*", CallableSink("ledger", lambda m: delivered.append(m.id)))
    with psycopg.connect(dsn) as conn:
        ids = [pgqueue.publish(conn, "orders.created", {"n": n}, key="c-1") for n in range(5)]
        conn.commit()
    with relay_running(app, role_dsn(dsn, roles.relay)):
        wait_until(lambda: len(delivered) == 5)
    assert delivered == ids
    with as_role(dsn, roles.relay) as conn:
        assert denied(conn, "SELECT * FROM pgqueue.jobs")


# ---------------------------------------------------------------- metrics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except urllib.error.URLError:
        return {}  # not serving yet: the server starts with the worker's run loop
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_metrics_endpoint_serves_the_documented_series(dsn: str) -> None:
    app = pgqueue.App()

    @app.task(queue="billing", max_attempts=2, retry=FAST)
    def charge(job: pgqueue.Job, mode: str) -> None:
        if mode == "flaky" and job.attempt == 1:
            raise RuntimeError("once")
        if mode == "broken":
            raise pgqueue.NonRetryable("never")

    modes = ["fine"] * 3 + ["flaky", "broken"]
    for mode in modes:
        enqueue(dsn, "charge", {"mode": mode}, queue="billing")
    port = free_port()
    labels = (("queue", "billing"), ("task", "charge"))
    with running_worker(
        app, dsn, metrics_port=port, heartbeat_seconds=0.1, rescue_seconds=0.1
    ) as worker:
        wait_until(lambda: jobs_left(dsn) == 0)
        wait_until(lambda: worker.stats.completed == 4 and worker.stats.failed == 1)
        # Queue gauges are sampled at each rescue pass: wait for one after the last job.
        billing = (("queue", "billing"),)
        metrics = wait_until(
            lambda: (
                (m := scrape(port)).get(("pgqueue_queue_dead_jobs", billing)) == 1
                and m.get(("pgqueue_queue_ready_jobs", billing)) == 0
                and m
            )
        )
    assert metrics[("pgqueue_jobs_started_total", labels)] == 6
    assert metrics[("pgqueue_jobs_succeeded_total", labels)] == 4
    assert metrics[("pgqueue_jobs_retried_total", labels)] == 1
    assert metrics[("pgqueue_jobs_dead_lettered_total", labels)] == 1
    assert metrics[("pgqueue_job_duration_seconds_count", labels)] == 6
    infinity = tuple(sorted((*labels, ("le", "+Inf"))))
    assert metrics[("pgqueue_job_duration_seconds_bucket", infinity)] == 6
    assert metrics[("pgqueue_lease_lost_total", ())] == 0
    assert metrics[("pgqueue_queue_ready_jobs", (("queue", "billing"),))] == 0
    assert metrics[("pgqueue_queue_lag_seconds", (("queue", "billing"),))] == 0
    documented = {
        "pgqueue_jobs_started_total",
        "pgqueue_jobs_succeeded_total",
        "pgqueue_jobs_retried_total",
        "pgqueue_jobs_dead_lettered_total",
        "pgqueue_job_duration_seconds_bucket",
        "pgqueue_job_duration_seconds_sum",
        "pgqueue_job_duration_seconds_count",
        "pgqueue_lease_lost_total",
        "pgqueue_queue_ready_jobs",
        "pgqueue_queue_lag_seconds",
        "pgqueue_queue_dead_jobs",
    }
    assert documented <= {name for name, _ in metrics}


def test_the_relay_metrics_endpoint_counts_deliveries_per_sink(dsn: str) -> None:
    from tests.integration.test_outbox import relay_running

    failures: set[str] = set()

    def receive(message: Message) -> None:
        if message.payload["n"] == 0 and message.id not in failures:
            failures.add(message.id)
            raise RuntimeError("receiver hiccup")

    app = pgqueue.App()
    app.route("orders.*", CallableSink("ledger", receive), retry=FAST)
    with psycopg.connect(dsn) as conn:
        for n in range(4):
            pgqueue.publish(conn, "orders.created", {"n": n})
        conn.commit()
    port = free_port()
    with relay_running(app, dsn, metrics_port=port):
        metrics = wait_until(
            lambda: (
                (m := scrape(port)).get(("pgqueue_outbox_delivered_total", (("sink", "ledger"),)))
                == 4
                and m
            )
        )
    assert metrics[("pgqueue_outbox_failed_total", (("sink", "ledger"),))] == 1
    assert ("pgqueue_outbox_lag_seconds", ()) in metrics


def test_the_cli_prints_and_applies_the_same_grants(dsn: str) -> None:
    from tests.cli.test_cli import pgqueue as run_cli

    printed = run_cli("roles", "--sql", "--prefix", "cli_t")
    assert printed.returncode == 0, printed.stderr
    names = RoleNames.for_schema("pgqueue", prefix="cli_t")
    assert printed.stdout == grants_sql("pgqueue", names)
    bare = run_cli("roles")
    assert bare.returncode == 2 and "--sql" in bare.stderr
    try:
        applied = run_cli("roles", "apply", "--prefix", "cli_t", "--json", "--dsn", dsn)
        assert applied.returncode == 0, applied.stderr
        again = run_cli("roles", "apply", "--prefix", "cli_t", "--dsn", dsn)
        assert again.returncode == 0, "running it again is harmless"
        with as_role(dsn, names.reader) as conn:
            conn.execute("SELECT * FROM pgqueue.queue_stats").fetchall()
            assert denied(conn, "SELECT * FROM pgqueue.jobs")
        actions = scalar(dsn, "SELECT array_agg(action) FROM pgqueue.audit_log")
        assert actions == ["roles.apply", "roles.apply"]
    finally:
        drop_roles(dsn, names)
