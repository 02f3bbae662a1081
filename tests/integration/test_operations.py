"""Operator actions against real PostgreSQL and a real worker: requeue and purge dead letters,
cancel, retry now, prune, the audit trail and per-job history.

Dead letters are made the way production makes them: a Worker thread runs handlers that fail.
The CLI runs as users run it (a subprocess) where the command itself is what is tested.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgqueue
from pgqueue import operations
from pgqueue.operations import DeadLetterFilter
from tests.cli.test_cli import pgqueue as run_cli
from tests.integration.worker_runner import enqueue, jobs_left, running_worker, scalar, wait_until

FAST = pgqueue.RetryPolicy(base_seconds=0.05, max_seconds=0.1)


def cli(dsn: str, *args: str) -> Any:
    result = run_cli(*args, "--dsn", dsn)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def rows(dsn: str, query: str, params: Any = ()) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()


def dead_ids(dsn: str) -> set[int]:
    return {r["id"] for r in rows(dsn, "SELECT id FROM pgqueue.dead_jobs")}


class Shop:
    """Tasks that fail with the error they are given while ``failing`` is set."""

    def __init__(self) -> None:
        self.app = pgqueue.App()
        self.failing = threading.Event()
        self.failing.set()
        self.ran: list[int] = []
        self.lock = threading.Lock()

        def handler(job: pgqueue.Job, error: str = "") -> None:
            if self.failing.is_set() and error:
                raise pgqueue.NonRetryable(error)
            with self.lock:
                self.ran.append(job.id)

        for name, queue in (("charge", "billing"), ("refund", "billing"), ("send", "email")):
            self.app.task(name=name, queue=queue, max_attempts=1)(handler)


def test_requeue_with_filters_moves_exactly_the_matching_jobs_and_they_run_again(
    dsn: str,
) -> None:
    shop = Shop()
    made: dict[tuple[str, str, str], list[int]] = {}
    for task, queue, error, count in (
        ("charge", "billing", "card declined by issuer", 3),
        ("charge", "billing", "gateway timeout", 2),
        ("refund", "billing", "Card DECLINED", 2),
        ("send", "email", "card declined (sic)", 2),
    ):
        made[(task, queue, error)] = [
            enqueue(dsn, task, {"error": error}, queue=queue) for _ in range(count)
        ]
    with running_worker(shop.app, dsn):
        wait_until(lambda: jobs_left(dsn) == 0)
    everything = {job_id for ids in made.values() for job_id in ids}
    assert dead_ids(dsn) == everything and shop.ran == []

    # The filters combine: billing, task charge, error containing "declined" in any case.
    dry = json.loads(
        cli(dsn, "dlq", "requeue", "--queue", "billing", "--task", "charge", "--error",
            "DECLINED", "--dry-run", "--json").stdout
    )  # fmt: skip
    matching = set(made[("charge", "billing", "card declined by issuer")])
    assert (dry["matched"], set(dry["ids"]), dry["requeued"]) == (3, matching, 0)
    assert dead_ids(dsn) == everything, "a dry run changes nothing"
    done = json.loads(
        cli(dsn, "dlq", "requeue", "--queue", "billing", "--task", "charge", "--error",
            "DECLINED", "--yes", "--json").stdout
    )  # fmt: skip
    assert (done["matched"], done["requeued"], done["skipped"]) == (3, 3, 0)
    assert dead_ids(dsn) == everything - matching
    requeued = rows(dsn, "SELECT id, state, attempts, run_at <= now() AS due FROM pgqueue.jobs")
    assert {r["id"] for r in requeued} == matching
    assert all((r["state"], r["attempts"], r["due"]) == ("available", 0, True) for r in requeued)

    shop.failing.clear()
    with running_worker(shop.app, dsn):
        wait_until(lambda: jobs_left(dsn) == 0)
    assert sorted(shop.ran) == sorted(matching), "exactly the requeued jobs ran, once each"
    assert dead_ids(dsn) == everything - matching

    # --error matches across queues and tasks; the rest stays.
    shop.ran.clear()
    cli(dsn, "dlq", "requeue", "--error", "declined", "--yes")
    with running_worker(shop.app, dsn):
        wait_until(lambda: jobs_left(dsn) == 0)
    declined = set(made[("refund", "billing", "Card DECLINED")]) | set(
        made[("send", "email", "card declined (sic)")]
    )
    assert sorted(shop.ran) == sorted(declined)
    assert dead_ids(dsn) == set(made[("charge", "billing", "gateway timeout")])


def test_requeued_dead_head_runs_first_and_its_key_follows_in_order(dsn: str) -> None:
    app = pgqueue.App()
    ran: list[int] = []
    broken = threading.Event()
    broken.set()

    @app.task(max_attempts=1)
    def step(job: pgqueue.Job, n: int) -> None:
        if n == 0 and broken.is_set():
            raise pgqueue.NonRetryable("step 0 is broken")
        ran.append(n)

    with psycopg.connect(dsn) as conn:
        ids = [pgqueue.enqueue(conn, "step", {"n": n}, ordering_key="acct-1") for n in range(3)]
        conn.commit()
    with running_worker(app, dsn):
        wait_until(lambda: dead_ids(dsn) == {ids[0]})
        # The dead head blocks its key: the two jobs behind it wait.
        assert scalar(dsn, "SELECT count(*) FROM pgqueue.jobs WHERE state = 'waiting'") == 2
        (blocked,) = rows(dsn, "SELECT key, reason, head_id, waiting FROM pgqueue.blocked_keys")
        assert blocked == {"key": "acct-1", "reason": "dead", "head_id": ids[0], "waiting": 2}
        broken.clear()
        with psycopg.connect(dsn) as conn:
            assert operations.requeue_dead(conn, DeadLetterFilter(ids=[ids[0]])) == [ids[0]]
            conn.commit()
        wait_until(lambda: jobs_left(dsn) == 0)
    assert ran == [0, 1, 2]
    assert rows(dsn, "SELECT * FROM pgqueue.blocked_keys") == []


def test_purging_a_dead_head_releases_its_key(dsn: str) -> None:
    app = pgqueue.App()
    ran: list[int] = []

    @app.task(max_attempts=1)
    def step(job: pgqueue.Job, n: int) -> None:
        if n == 0:
            raise pgqueue.NonRetryable("step 0 is broken")
        ran.append(n)

    with psycopg.connect(dsn) as conn:
        ids = [pgqueue.enqueue(conn, "step", {"n": n}, ordering_key="acct-2") for n in range(3)]
        conn.commit()
    with running_worker(app, dsn):
        wait_until(lambda: dead_ids(dsn) == {ids[0]})
        result = json.loads(cli(dsn, "dlq", "purge", "--id", str(ids[0]), "--yes", "--json").stdout)
        assert result["purged"] == 1
        wait_until(lambda: jobs_left(dsn) == 0)
    assert ran == [1, 2] and dead_ids(dsn) == set()


def test_cancel_dead_letters_live_jobs_and_discards_a_running_result(dsn: str) -> None:
    app = pgqueue.App()
    started = threading.Event()
    release = threading.Event()
    finished: list[int] = []

    @app.task
    def slow(job: pgqueue.Job) -> None:
        started.set()
        release.wait(20)
        finished.append(job.id)

    running = enqueue(dsn, "slow", {})
    scheduled = enqueue(dsn, "slow", {}, delay=3600)
    with running_worker(app, dsn, concurrency=1) as worker:
        wait_until(started.is_set)
        result = run_cli("jobs", "cancel", str(running), str(scheduled), "424242",
                         "--reason", "customer left", "--json", "--dsn", dsn)  # fmt: skip
        assert result.returncode == 1, "one id was not found"
        report = json.loads(result.stdout)
        assert (sorted(report["cancelled"]), report["not_found"]) == (
            sorted([running, scheduled]),
            [424242],
        )
        release.set()
        wait_until(lambda: finished == [running])
        # Its success is discarded, found either by the ack or by a heartbeat first.
        wait_until(lambda: worker.stats.lost == 1 or running in worker.lost)
    assert worker.stats.completed == 0
    dead = {r["id"]: r for r in rows(dsn, "SELECT id, reason, last_error FROM pgqueue.dead_jobs")}
    assert set(dead) == {running, scheduled}, "the running job's late success changed nothing"
    assert dead[running]["reason"] == "cancelled"
    assert dead[running]["last_error"].startswith("cancelled by an operator: customer left")
    assert jobs_left(dsn) == 0
    assert scalar(dsn, "SELECT coalesce(sum(completed), 0) FROM pgqueue.queue_throughput") == 0


def test_retry_now_runs_a_job_waiting_for_its_backoff_at_once(dsn: str) -> None:
    app = pgqueue.App()
    runs: list[int] = []

    @app.task(max_attempts=5, retry=pgqueue.RetryPolicy(base_seconds=3600, jitter=False))
    def flaky(job: pgqueue.Job) -> None:
        runs.append(job.attempt)
        if job.attempt == 1:
            raise RuntimeError("first try fails")

    job_id = enqueue(dsn, "flaky", {})
    with running_worker(app, dsn):
        wait_until(lambda: runs == [1])
        wait_until(
            lambda: scalar(dsn, "SELECT run_at > now() FROM pgqueue.jobs WHERE id = %s", (job_id,))
        )
        result = cli(dsn, "jobs", "retry", str(job_id))
        assert result.stdout.strip() == f"job {job_id} is ready: a worker will run it now"
        wait_until(lambda: jobs_left(dsn) == 0)
    assert runs == [1, 2]
    again = run_cli("jobs", "retry", str(job_id), "--dsn", dsn)
    assert again.returncode == 1 and f"no job {job_id}" in again.stderr


def test_operator_actions_are_audited_with_role_count_and_details(dsn: str) -> None:
    shop = Shop()
    for n in range(5):
        enqueue(dsn, "charge", {"error": f"declined #{n}"}, queue="billing")
    for _ in range(2):
        enqueue(dsn, "send", {"error": "bounced"}, queue="email")
    with running_worker(shop.app, dsn):
        wait_until(lambda: len(dead_ids(dsn)) == 7)
    cli(dsn, "dlq", "requeue", "--queue", "billing", "--yes")
    cli(dsn, "dlq", "purge", "--queue", "email", "--yes")
    cli(dsn, "queues", "pause", "billing")
    with psycopg.connect(dsn) as conn:
        cancelled = operations.cancel_jobs(conn, [max(dead_ids(dsn) | {0}) + 1000], reason="x")
        conn.commit()
    assert cancelled == []
    trail = rows(dsn, "SELECT * FROM pgqueue.audit_log ORDER BY id")
    me = scalar(dsn, "SELECT current_user")
    assert [(r["action"], r["target"], r["count"], r["role"]) for r in trail] == [
        ("dlq.requeue", "jobs", 5, me),
        ("dlq.purge", "jobs", 2, me),
        ("queue.pause", "queue billing", 1, me),
        ("jobs.cancel", "jobs", 0, me),
    ]
    assert trail[0]["details"] == {"queue": "billing", "matched": 5}
    assert trail[1]["details"] == {"queue": "email", "matched": 2}
    assert trail[2]["details"]["is_paused"] is True
    assert trail[3]["details"]["reason"] == "x"
    assert all(r["at"] is not None for r in trail)
    shown = json.loads(cli(dsn, "audit", "--json", "--limit", "2").stdout)
    assert [r["action"] for r in shown] == ["jobs.cancel", "queue.pause"], "newest first"
    assert "dlq.requeue" in cli(dsn, "audit").stdout


def test_the_audit_trail_rejects_update_and_delete_even_from_its_owner(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        operations.record(conn, "test.action", "nothing", 1)
        conn.commit()
        for statement in (
            "UPDATE pgqueue.audit_log SET count = 2",
            "DELETE FROM pgqueue.audit_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)
            conn.rollback()
    assert scalar(dsn, "SELECT count FROM pgqueue.audit_log") == 1


def test_the_audit_trail_rejects_truncate(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        operations.record(conn, "test.action", "nothing", 1)
        conn.commit()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("TRUNCATE pgqueue.audit_log")


def events(dsn: str, job_id: int) -> list[str]:
    found = rows(
        dsn, "SELECT event FROM pgqueue.job_events WHERE job_id = %s ORDER BY id", (job_id,)
    )
    return [r["event"] for r in found]


def test_job_events_record_each_jobs_life_and_jobs_show_prints_it(dsn: str) -> None:
    assert "job events are off" in cli(dsn, "audit", "job-events").stdout
    assert json.loads(cli(dsn, "audit", "job-events", "on", "--json").stdout) == {
        "job_events": "on"
    }
    app = pgqueue.App()
    seen: dict[str, int] = {}

    @app.task(max_attempts=3, retry=FAST)
    def work(job: pgqueue.Job, mode: str) -> None:
        seen[mode] = seen.get(mode, 0) + 1
        if mode == "flaky" and seen[mode] == 1:
            raise RuntimeError("try again")
        if mode == "broken":
            raise pgqueue.NonRetryable("never works")

    ids = {mode: enqueue(dsn, "work", {"mode": mode}) for mode in ("fine", "flaky", "broken")}
    with psycopg.connect(dsn) as conn:
        ids["first"] = pgqueue.enqueue(conn, "work", {"mode": "first"}, ordering_key="k")
        ids["second"] = pgqueue.enqueue(conn, "work", {"mode": "second"}, ordering_key="k")
        conn.commit()
    with running_worker(app, dsn) as worker:
        wait_until(lambda: jobs_left(dsn) == 0)
    assert events(dsn, ids["fine"]) == ["enqueued", "claimed", "completed"]
    assert events(dsn, ids["flaky"]) == ["enqueued", "claimed", "retried", "claimed", "completed"]
    assert events(dsn, ids["broken"]) == ["enqueued", "claimed", "dead_lettered"]
    assert events(dsn, ids["second"]) == ["enqueued", "unblocked", "claimed", "completed"]
    history = rows(dsn, "SELECT attempt, worker_id FROM pgqueue.job_events WHERE job_id = %s"
                   " ORDER BY id", (ids["flaky"],))  # fmt: skip
    assert [h["attempt"] for h in history] == [0, 1, 1, 2, 2]
    assert [str(h["worker_id"]) for h in history[1:]] == [str(worker.id)] * 4

    shown = json.loads(cli(dsn, "jobs", "show", str(ids["broken"]), "--json").stdout)
    assert (shown["location"], shown["state"], shown["reason"]) == ("dead", "dead", "non_retryable")
    assert [h["event"] for h in shown["history"]] == ["enqueued", "claimed", "dead_lettered"]
    assert "never works" in shown["last_error"]
    table = cli(dsn, "jobs", "show", str(ids["broken"])).stdout
    assert "dead_lettered" in table and "never works" in table

    # A cancelled and a requeued job are recorded too; `off` stops recording.
    job_id = enqueue(dsn, "work", {"mode": "fine"}, delay=3600)
    cli(dsn, "jobs", "cancel", str(job_id))
    cli(dsn, "dlq", "requeue", "--id", str(job_id), "--yes")
    assert events(dsn, job_id) == ["enqueued", "dead_lettered", "enqueued"]
    assert "job events are off" in cli(dsn, "audit", "job-events", "off").stdout
    enqueue(dsn, "work", {"mode": "fine"})
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.job_events WHERE event = 'enqueued'") == 7
    actions = [r["action"] for r in rows(dsn, "SELECT action FROM pgqueue.audit_log ORDER BY id")]
    assert actions[0] == "audit.job_events.on" and actions[-1] == "audit.job_events.off"
    assert scalar(dsn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'pgqueue.jobs'::regclass"
                       " AND NOT tgisinternal") == 0  # fmt: skip


def test_prune_deletes_only_what_is_older_than_its_retention(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgqueue.dead_jobs (id, queue, task, args, headers, priority, attempts,"
            " reason, created_at, failed_at)"
            " SELECT i, 'q', 't', '{}', '{}', 0, 1, 'max_attempts', now() - interval '60 days',"
            " now() - CASE WHEN i <= 12000 THEN interval '40 days' ELSE interval '1 day' END"
            " FROM generate_series(1, 12010) AS i"
        )
        conn.execute(
            "INSERT INTO pgqueue.outbox_delivered (id, message_id, topic, payload, headers,"
            " attempts, created_at, delivered_at)"
            " SELECT i, gen_random_uuid(), 't', '{}', '{}', 1, now() - interval '3 days',"
            " now() - CASE WHEN i <= 7 THEN interval '2 days' ELSE interval '1 hour' END"
            " FROM generate_series(1, 10) AS i"
        )
        conn.execute(
            "INSERT INTO pgqueue.job_events (at, job_id, queue, task, event, attempt)"
            " SELECT now() - CASE WHEN i <= 4 THEN interval '8 days' ELSE interval '1 day' END,"
            " i, 'q', 't', 'enqueued', 0 FROM generate_series(1, 6) AS i"
        )
    result = json.loads(cli(dsn, "prune", "--json").stdout)
    assert result == {
        "dead_jobs": 12000,
        "dead_messages": 0,
        "delivered_messages": 7,
        "job_events": 4,
    }
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.dead_jobs") == 10
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.outbox_delivered") == 3
    assert scalar(dsn, "SELECT count(*) FROM pgqueue.job_events") == 2
    (entry,) = rows(dsn, "SELECT action, count, details FROM pgqueue.audit_log")
    assert (entry["action"], entry["count"]) == ("prune", 12011)
    shorter = cli(dsn, "prune", "--dead-days", "0.5", "--events-days", "0.5")
    assert "10 dead jobs" in shorter.stdout and "2 job events" in shorter.stdout
