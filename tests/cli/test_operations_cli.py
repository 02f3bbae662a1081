"""`pgqueue jobs|dlq|workers|prune|audit|status --check` as users run them: real processes,
real database, exit codes, and a canary password that must never show.

Dead letters are made from real jobs (enqueue, then ``cancel_jobs``) and then given the
error text and age a scenario needs, so their ids come from the jobs' own sequence.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

import pgqueue
from tests.cli.test_cli import CANARY
from tests.integration.worker_runner import enqueue, jobs_left, running_worker, wait_until


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    """The CLI as a subprocess, without a terminal on stdin (as under cron or CI)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PGQUEUE_DSN", "DATABASE_URL")}
    environment["COLUMNS"] = "200"  # wide enough that tables are not cut
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pgqueue.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str) -> Any:
    result = run(*args)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def fails(code: int, *args: str) -> Any:
    result = run(*args)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return result


def rows(dsn: str, query: str, params: Any = ()) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()


def execute(dsn: str, statement: str, params: Any = ()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


def dead_letter(dsn: str, queue: str, task: str, error: str, days_ago: float = 0) -> int:
    """A real job, dead-lettered with ``error`` ``days_ago`` days ago."""
    job_id = enqueue(dsn, task, {}, queue=queue)
    execute(dsn, "SELECT pgqueue.cancel_jobs(ARRAY[%s]::bigint[], 'seed')", (job_id,))
    execute(
        dsn,
        "UPDATE pgqueue.dead_jobs SET reason = 'max_attempts', last_error = %s,"
        " failed_at = now() - make_interval(secs => %s) WHERE id = %s",
        (error, days_ago * 86400, job_id),
    )
    return job_id


def dead_ids(dsn: str) -> set[int]:
    return {r["id"] for r in rows(dsn, "SELECT id FROM pgqueue.dead_jobs")}


def with_terminal(answer: str, *args: str) -> tuple[int, str, str]:
    """Run the CLI with a terminal on stdin (as a person would) and type ``answer``."""
    leader, follower = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if k not in ("PGQUEUE_DSN", "DATABASE_URL")}
    environment["COLUMNS"] = "200"
    process = subprocess.Popen(
        [sys.executable, "-m", "pgqueue.cli.main", *args],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    os.close(follower)
    try:
        os.write(leader, answer.encode())
        out, err = process.communicate(timeout=60)
    finally:
        os.close(leader)
    return process.returncode, out, err


# ---------------------------------------------------------------- status --check


def test_status_check_exits_5_when_dead_letters_cross_the_threshold(dsn: str) -> None:
    for n in range(3):
        dead_letter(dsn, "billing", "charge", f"declined {n}")
    passed = ok("status", "--check", "--max-dead", "3", "--dsn", dsn)
    assert "check passed" in passed.stdout and passed.stderr == ""
    crossed = fails(5, "status", "--check", "--max-dead", "2", "--dsn", dsn)
    assert crossed.stderr.strip() == (
        "check failed: 3 dead letters (3 jobs, 0 outbox messages) > --max-dead 2"
    )
    assert "billing" in crossed.stdout, "the status table is still printed"
    # A threshold alone implies --check; dead outbox messages count too.
    with psycopg.connect(dsn) as conn:
        pgqueue.publish(conn, "orders", {"n": 1})
        conn.commit()
    execute(
        dsn,
        "INSERT INTO pgqueue.outbox_dead (id, message_id, topic, payload, headers, attempts,"
        " reason, created_at) SELECT id, message_id, topic, payload, headers, 1, 'rejected',"
        " created_at FROM pgqueue.outbox",
    )
    execute(dsn, "DELETE FROM pgqueue.outbox")
    implied = fails(5, "status", "--max-dead", "3", "--json", "--dsn", dsn)
    report = json.loads(implied.stdout)
    assert report["ok"] is False
    assert report["problems"] == ["4 dead letters (3 jobs, 1 outbox messages) > --max-dead 3"]
    assert [q["queue"] for q in report["queues"]] == ["billing"]
    assert report["health"]["verdict"] == "ok"


def test_status_check_exits_5_when_the_lag_crosses_the_threshold(dsn: str) -> None:
    job_id = enqueue(dsn, "charge", {}, queue="billing")
    enqueue(dsn, "send", {}, queue="email")
    assert ok("status", "--check", "--max-lag", "60", "--dsn", dsn).returncode == 0
    execute(
        dsn,
        "UPDATE pgqueue.jobs SET run_at = now() - interval '10 minutes' WHERE id = %s",
        (job_id,),
    )
    crossed = fails(5, "status", "--check", "--max-lag", "300", "--dsn", dsn)
    (line,) = crossed.stderr.splitlines()
    assert line.startswith("check failed: queue 'billing': lag 6") and line.endswith(
        "s > --max-lag 300s"
    )
    ok("queues", "pause", "billing", "--dsn", dsn)
    paused = fails(5, "status", "--max-lag", "300", "--dsn", dsn)
    assert "(the queue is paused)" in paused.stderr
    assert ok("status", "--check", "--max-lag", "900", "--dsn", dsn).returncode == 0
    # Without --check the JSON is the list of queues, as it always was.
    plain = json.loads(ok("status", "--json", "--dsn", dsn).stdout)
    assert [q["queue"] for q in plain] == ["billing", "email"]
    assert 600 <= plain[0]["lag_seconds"] < 700


def test_status_check_fails_on_outbox_lag_and_on_a_critical_verdict(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        message_id = pgqueue.publish(conn, "orders", {"n": 1})
        conn.commit()
    assert ok("status", "--check", "--max-outbox-lag", "60", "--dsn", dsn).returncode == 0
    execute(
        dsn,
        "UPDATE pgqueue.outbox SET created_at = now() - interval '10 minutes'"
        " WHERE message_id = %s",
        (message_id,),
    )
    crossed = fails(5, "status", "--check", "--max-outbox-lag", "60", "--dsn", dsn)
    assert "check failed: outbox: oldest undelivered message waits 6" in crossed.stderr
    # Ten minutes is a 'warning' verdict: shown, but the check passes without a threshold.
    warned = ok("status", "--check", "--dsn", dsn)
    assert "health: warning: the oldest undelivered outbox message waits" in warned.stdout
    execute(dsn, "UPDATE pgqueue.outbox SET created_at = now() - interval '20 minutes'")
    critical = fails(5, "status", "--check", "--dsn", dsn)
    assert critical.stderr.startswith("check failed: health is critical: the oldest undelivered")
    report = json.loads(fails(5, "status", "--check", "--json", "--dsn", dsn).stdout)
    assert report["health"]["verdict"] == "critical"
    assert 1200 <= report["health"]["relay_lag"] < 1300, "durations in seconds"


# ---------------------------------------------------------------- dead letters


def test_dlq_list_filters_by_queue_task_error_and_age(dsn: str) -> None:
    old = dead_letter(dsn, "billing", "charge", "Card declined\nTraceback...", days_ago=10)
    new = dead_letter(dsn, "billing", "charge", "gateway timeout", days_ago=0)
    other = dead_letter(dsn, "email", "send", "card DECLINED by relay")

    def listed(*filters: str) -> list[int]:
        out = ok("dlq", "list", *filters, "--json", "--dsn", dsn).stdout
        return [row["job_id"] for row in json.loads(out)]

    assert listed() == [other, new, old], "newest first"
    assert listed("--queue", "billing") == [new, old]
    assert listed("--task", "send") == [other]
    assert listed("--error", "declined") == [other, old]
    assert listed("--older-than-days", "5") == [old]
    assert listed("--queue", "billing", "--error", "DECLINED") == [old]
    (first,) = json.loads(ok("dlq", "list", "--limit", "1", "--json", "--dsn", dsn).stdout)
    assert first["error"] == "card DECLINED by relay"
    table = ok("dlq", "list", "--limit", "2", "--dsn", dsn).stdout
    assert "gateway timeout" in table and "showing 2 of 3" in table
    assert "Traceback" not in ok("dlq", "list", "--dsn", dsn).stdout, "first line only"


def test_dlq_actions_need_a_filter_or_all_and_a_confirmation(dsn: str) -> None:
    ids = [dead_letter(dsn, "billing", "charge", f"declined {n}") for n in range(3)]
    everything = set(ids)
    nothing = fails(2, "dlq", "requeue", "--dsn", dsn)
    assert "--all" in nothing.stderr
    fails(2, "dlq", "purge", "--all", "--queue", "billing", "--dsn", dsn)
    # No terminal to ask on (cron, CI): --yes is required, and nothing happens without it.
    unconfirmed = fails(2, "dlq", "purge", "--all", "--dsn", dsn)
    assert "add --yes" in unconfirmed.stderr
    assert dead_ids(dsn) == everything
    dry = ok("dlq", "purge", "--all", "--dry-run", "--dsn", dsn)
    assert "3 dead letter(s) match; dry run: nothing changed" in dry.stdout
    assert dead_ids(dsn) == everything
    # A person at a terminal sees the count and answers.
    code, out, err = with_terminal("n\n", "dlq", "purge", "--queue", "billing", "--dsn", dsn)
    assert code == 1 and "Purge (delete for good) 3 dead letter(s)?" in out, (out, err)
    assert "aborted: nothing changed" in err and dead_ids(dsn) == everything
    code, out, err = with_terminal("y\n", "dlq", "requeue", "--id", str(ids[0]), "--dsn", dsn)
    assert code == 0 and "requeued 1 of 1 dead letter(s)" in out, (out, err)
    assert dead_ids(dsn) == everything - {ids[0]}
    purged = json.loads(ok("dlq", "purge", "--all", "--yes", "--json", "--dsn", dsn).stdout)
    assert (purged["matched"], purged["purged"]) == (2, 2)
    assert dead_ids(dsn) == set()
    assert "no dead letters match" in ok("dlq", "purge", "--all", "--yes", "--dsn", dsn).stdout


def test_dlq_requeue_of_thousands_is_one_audited_action(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        ids = pgqueue.enqueue_many(conn, [("charge", {"n": n}) for n in range(2500)])
        conn.commit()
    execute(dsn, "SELECT pgqueue.cancel_jobs(%s::bigint[], 'seed')", (ids,))
    result = json.loads(ok("dlq", "requeue", "--all", "--yes", "--json", "--dsn", dsn).stdout)
    assert (result["matched"], result["requeued"], result["skipped"]) == (2500, 2500, 0)
    assert dead_ids(dsn) == set()
    assert rows(dsn, "SELECT count(*) AS n FROM pgqueue.jobs")[0]["n"] == 2500
    (entry,) = rows(dsn, "SELECT action, count FROM pgqueue.audit_log")
    assert entry == {"action": "dlq.requeue", "count": 2500}


def test_a_dead_letter_whose_unique_key_is_taken_stays_and_the_command_says_so(dsn: str) -> None:
    first = enqueue(dsn, "invoice", {}, unique_key="inv-1")
    execute(dsn, "SELECT pgqueue.cancel_jobs(ARRAY[%s]::bigint[], 'seed')", (first,))
    second = enqueue(dsn, "invoice", {}, unique_key="inv-1")
    result = run("dlq", "requeue", "--all", "--yes", "--dsn", dsn)
    assert result.returncode == 0
    assert "requeued 0 of 1" in result.stdout and "1 left in place" in result.stderr
    assert dead_ids(dsn) == {first}
    retried = fails(1, "jobs", "retry", str(first), "--dsn", dsn)
    assert "stays in the dead letters: a live job holds its unique key 'inv-1'" in retried.stderr
    assert second != first


# ---------------------------------------------------------------- jobs


def test_jobs_list_show_retry_and_cancel(dsn: str) -> None:
    ready = enqueue(dsn, "charge", {"amount": 5}, queue="billing")
    later = enqueue(dsn, "report", {}, queue="billing", delay=3600)
    with psycopg.connect(dsn) as conn:
        head = pgqueue.enqueue(conn, "sync", {}, queue="email", ordering_key="acct")
        behind = pgqueue.enqueue(conn, "sync", {}, queue="email", ordering_key="acct")
        conn.commit()

    def listed(*filters: str) -> list[int]:
        return [
            r["id"] for r in json.loads(ok("jobs", "list", *filters, "--json", "--dsn", dsn).stdout)
        ]

    assert listed() == [behind, head, later, ready]
    assert listed("--queue", "billing") == [later, ready]
    assert listed("--task", "sync", "--state", "waiting") == [behind]
    assert listed("--limit", "1") == [behind]
    fails(2, "jobs", "list", "--state", "finished", "--dsn", dsn)
    assert "charge" in ok("jobs", "list", "--dsn", dsn).stdout

    shown = json.loads(ok("jobs", "show", str(ready), "--json", "--dsn", dsn).stdout)
    assert (shown["location"], shown["state"], shown["args"]) == (
        "live",
        "available",
        {"amount": 5},
    )
    assert shown["history"] == [] and shown["job_events_recorded"] is False
    human = ok("jobs", "show", str(ready), "--dsn", dsn).stdout
    assert "job events are not recorded" in human and "billing" in human
    missing = fails(1, "jobs", "show", "999999", "--dsn", dsn)
    assert missing.stderr.startswith("error: no job 999999")

    assert "a worker will run it now" in ok("jobs", "retry", str(later), "--dsn", dsn).stdout
    assert rows(dsn, "SELECT run_at <= now() AS due FROM pgqueue.jobs WHERE id = %s", (later,)) == [
        {"due": True}
    ]
    assert "already available" in ok("jobs", "retry", str(ready), "--dsn", dsn).stdout
    assert (
        "waits behind ordering key 'acct'" in ok("jobs", "retry", str(behind), "--dsn", dsn).stdout
    )

    cancelled = ok("jobs", "cancel", str(head), "--reason", "duplicate", "--dsn", dsn)
    assert cancelled.stdout.strip() == f"cancelled 1 job(s): {head}"
    # The key moves on at once: the job behind the cancelled head is ready now.
    assert rows(dsn, "SELECT state FROM pgqueue.jobs WHERE id = %s", (behind,)) == [
        {"state": "available"}
    ]
    retried = json.loads(ok("jobs", "retry", str(head), "--json", "--dsn", dsn).stdout)
    assert (retried["outcome"], retried["changed"]) == ("requeued", True)
    assert head not in dead_ids(dsn)
    assert [r["action"] for r in rows(dsn, "SELECT action FROM pgqueue.audit_log ORDER BY id")] == [
        "jobs.retry",
        "jobs.retry",
        "jobs.retry",
        "jobs.cancel",
        "dlq.requeue",
    ]


# ---------------------------------------------------------------- workers, prune, audit


def test_workers_lists_registered_processes_and_their_liveness(dsn: str) -> None:
    assert json.loads(ok("workers", "--json", "--dsn", dsn).stdout) == []
    app = pgqueue.App()

    @app.task(queue="billing")
    def charge(job: pgqueue.Job) -> None:
        pass

    with running_worker(app, dsn, concurrency=3) as worker:
        listed = wait_until(lambda: json.loads(ok("workers", "--json", "--dsn", dsn).stdout))
        (row,) = listed
        assert (row["worker_id"], row["kind"], row["queues"], row["concurrency"]) == (
            str(worker.id),
            "worker",
            ["billing"],
            3,
        )
        assert row["is_alive"] is True and row["pid"] == os.getpid()
        assert "billing" in ok("workers", "--dsn", dsn).stdout
    assert json.loads(ok("workers", "--json", "--dsn", dsn).stdout) == [], "a clean exit leaves"


def test_exit_codes_for_usage_errors_and_an_unmigrated_schema(dsn: str, empty_dsn: str) -> None:
    fails(2, "jobs", "retry", "not-a-number", "--dsn", dsn)
    fails(2, "prune", "--dead-days", "-1", "--dsn", dsn)
    fails(2, "audit", "job-events", "maybe", "--dsn", dsn)
    bad_name = fails(1, "jobs", "list", "--queue", "no spaces", "--dsn", dsn)
    assert "invalid queue name" in bad_name.stderr
    not_ready = fails(3, "dlq", "list", "--dsn", empty_dsn)
    assert "pgqueue migrate" in not_ready.stderr
    fails(3, "status", "--check", "--dsn", empty_dsn)
    fails(1, "jobs", "list")  # no DSN at all
    assert "PGQUEUE_DSN" in run("jobs", "list").stderr


# ---------------------------------------------------------------- the canary password


def canary_dsn(dsn: str) -> str:
    """``dsn`` with the canary password (the test server trusts, so it still connects)."""
    return make_conninfo(dsn, password=CANARY)


def canary_url(dsn: str) -> str:
    parts = conninfo_to_dict(dsn)
    return (
        f"postgresql://{parts.get('user', 'postgres')}:{CANARY}@{parts['host']}:{parts['port']}"
        f"/{parts['dbname']}"
    )


def test_the_password_never_shows_in_cli_output(dsn: str) -> None:
    dead = dead_letter(dsn, "billing", "charge", "declined")
    commands = [
        ("status",),
        ("status", "--check", "--max-dead", "0"),
        ("jobs", "list"),
        ("jobs", "show", str(dead)),
        ("jobs", "show", "999999"),
        ("dlq", "list"),
        ("dlq", "requeue", "--all", "--dry-run"),
        ("dlq", "purge", "--all"),  # refuses: no --yes
        ("workers",),
        ("audit",),
        ("queues", "list"),
        ("outbox", "status"),
    ]
    # Each command once per DSN form, one as JSON and the other as a table.
    for form, output in ((canary_url(dsn), ("--json",)), (canary_dsn(dsn), ())):
        for command in commands:
            result = run(*command, *output, "--dsn", form)
            assert result.returncode in (0, 1, 2, 5), (command, result.stderr)
            assert CANARY not in result.stdout + result.stderr, (command, form)
    for form in (canary_url(dsn), canary_dsn(dsn)):
        result = run("jobs", "list", env={"PGQUEUE_DSN": form})
        assert result.returncode == 0 and CANARY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "unreachable",
    [
        f"postgresql://app:{CANARY}@127.0.0.1:1/shop",
        f"host=127.0.0.1 port=1 user=app password={CANARY} dbname=shop",
        f"postgresql://app:{CANARY}@127.0.0.1:1/shop?sslmode=bogus",
        f"postgresql://app:{CANARY}@[::1/shop",
        f"postgresql://app:{CANARY}@127.0.0.1:notaport/shop",
    ],
)
def test_the_password_never_shows_when_the_database_is_unreachable(unreachable: str) -> None:
    for command in (("status", "--check"), ("dlq", "purge", "--all", "--yes")):
        result = run(*command, "--dsn", unreachable)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
        assert CANARY not in result.stdout + result.stderr, result.stderr


def test_the_password_never_shows_for_a_missing_database(dsn: str) -> None:
    missing = make_conninfo(dsn, password=CANARY, dbname="no_such_database")
    result = run("jobs", "list", "--dsn", missing)
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert CANARY not in result.stdout + result.stderr


def test_the_password_never_shows_when_the_dsn_is_malformed() -> None:
    result = run("jobs", "list", "--dsn", f"host=127.0.0.1 password=Pa55 {CANARY}")
    assert result.returncode == 1
    assert CANARY not in result.stdout + result.stderr, result.stderr


def test_the_password_never_shows_in_views_error_columns_logs_or_application_name(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret_dsn = canary_url(dsn)
    unreachable = f"postgresql://app:{CANARY}@127.0.0.1:1/shop"
    app = pgqueue.App()

    @app.task(max_attempts=1)
    def sync_ledger(job: pgqueue.Job) -> None:
        # A handler that reaches a database through pgqueue, and fails: the error is stored.
        from pgqueue import db

        db.connect(unreachable, "ledger")

    caplog.set_level(logging.DEBUG, logger="pgqueue")
    failing = enqueue(dsn, "sync_ledger", {})
    with running_worker(app, secret_dsn, lease_seconds=2.0) as worker:
        wait_until(lambda: jobs_left(dsn) == 0)
        wait_until(lambda: rows(dsn, "SELECT 1 FROM pgqueue.workers"))
        sessions = rows(
            dsn,
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()",
        )
        names = [s["application_name"] for s in sessions]
        assert any(name.startswith("pgqueue-worker") for name in names), names
        assert all(CANARY not in name for name in names)
        with psycopg.connect(dsn) as conn:
            for view in ("queue_stats", "running_jobs", "dead_letters", "workers", "health"):
                text = conn.execute(
                    f"SELECT row_to_json(v)::text FROM pgqueue.{view} AS v"
                ).fetchall()
                assert all(CANARY not in row[0] for row in text), view
        assert worker.stats.failed == 1
    (stored,) = rows(dsn, "SELECT last_error FROM pgqueue.dead_jobs WHERE id = %s", (failing,))
    assert "cannot reach PostgreSQL" in stored["last_error"]
    assert CANARY not in stored["last_error"]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "cannot reach PostgreSQL" in logged and CANARY not in logged
    shown = ok("jobs", "show", str(failing), "--dsn", secret_dsn)
    assert "cannot reach PostgreSQL" in shown.stdout and CANARY not in shown.stdout
