"""The demo shop: business rows and jobs in one transaction, run by a worker.

Also the example app of ``docker-compose.yml``: ``pgqueue worker --app pgqueue.demo:app``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pgqueue import db
from pgqueue.app import App
from pgqueue.enqueue import JobSpec, enqueue, enqueue_many
from pgqueue.errors import Retry
from pgqueue.job import Job
from pgqueue.outbox import OutboxMessage, publish_many
from pgqueue.relay import Relay, RelaySettings
from pgqueue.retry import RetryPolicy
from pgqueue.sinks import Message
from pgqueue.sinks.local import CallableSink
from pgqueue.worker import Worker, WorkerSettings

app = App()
# Deliveries the demo's relay made, per customer key, in order (the "outside world").
delivered: dict[str, list[int]] = {}


def _record_delivery(message: Message) -> None:
    delivered.setdefault(message.key or "", []).append(int(message.payload["order_id"]))


app.route("order.*", CallableSink("demo-events", _record_delivery))
FAST_RETRY = RetryPolicy(base_seconds=0.2, max_seconds=1.0)


@app.task(queue="email", max_attempts=5, timeout=30)
def send_receipt(job: Job, order_id: int) -> None:
    """Mark the receipt sent in the same transaction that acknowledges the job."""
    with job.transaction() as conn:
        conn.execute("UPDATE demo_orders SET receipt_sent = true WHERE id = %s", (order_id,))


@app.task(queue="payments", max_attempts=3, retry=FAST_RETRY)
def charge_card(job: Job, order_id: int, amount_cents: int) -> None:
    """Fails on its first attempt (a flaky payment API), succeeds on the retry."""
    if job.attempt == 1:
        raise Retry(0.2, reason=f"payment API timed out for order {order_id}")


@app.task(queue="payments", max_attempts=3, retry=FAST_RETRY)
def refund_card(job: Job, order_id: int) -> None:
    """Always fails: shows a job reaching the dead letters with its traceback."""
    raise RuntimeError(f"card for order {order_id} was closed by the bank")


SETUP_SQL = """
CREATE TABLE IF NOT EXISTS demo_orders (
    id bigint PRIMARY KEY,
    customer text NOT NULL,
    amount_cents integer NOT NULL,
    receipt_sent boolean NOT NULL DEFAULT false
)
"""


def place_orders(dsn: str, count: int, *, per_transaction: int = 100) -> int:
    """Write ``count`` orders; each transaction inserts orders and enqueues their jobs."""
    with db.connect(dsn, "demo", autocommit=False) as conn:
        conn.execute(SETUP_SQL)
        conn.execute("TRUNCATE demo_orders")
        conn.commit()
        next_id = 1
        while next_id <= count:
            ids = list(range(next_id, min(count, next_id + per_transaction - 1) + 1))
            with conn.transaction():
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO demo_orders (id, customer, amount_cents) VALUES (%s, %s, %s)",
                        [(i, f"customer-{i % 97}", 1000 + i) for i in ids],
                    )
                jobs = [JobSpec("send_receipt", {"order_id": i}, queue="email") for i in ids]
                jobs += [
                    JobSpec(
                        "charge_card",
                        {"order_id": i, "amount_cents": 1000 + i},
                        queue="payments",
                        max_attempts=3,
                    )
                    for i in ids
                    if i % 500 == 0
                ]
                enqueue_many(conn, jobs)
                publish_many(
                    conn,
                    [
                        OutboxMessage("order.created", {"order_id": i}, key=f"customer-{i % 97}")
                        for i in ids
                    ],
                )
            next_id = ids[-1] + 1
        conn.commit()
        # A rolled-back transaction leaves neither the order nor its job.
        try:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO demo_orders (id, customer, amount_cents) VALUES (%s, 'x', 1)",
                    (count + 1,),
                )
                enqueue(conn, "send_receipt", {"order_id": count + 1}, queue="email")
                raise _Rollback
        except _Rollback:
            pass
        with conn.transaction():
            enqueue(conn, "refund_card", {"order_id": 1}, queue="payments", max_attempts=3)
    return count


class _Rollback(Exception):
    pass


def remaining(dsn: str) -> int:
    """Jobs not yet finished plus outbox messages not yet delivered."""
    with db.connect(dsn, "demo") as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pgqueue.jobs) + (SELECT count(*) FROM pgqueue.outbox)"
        ).fetchone()
    return int(row[0]) if row else 0


def run_workers(
    dsn: str, *, processes: int = 2, on_progress: Callable[[int], Any] | None = None
) -> list[Worker]:
    """Run ``processes`` workers and one relay (threads here) until nothing is left."""
    workers = [
        Worker(app, dsn, settings=WorkerSettings(concurrency=16, lease_seconds=10))
        for _ in range(processes)
    ]
    relay = Relay(app, dsn, settings=RelaySettings(lease_seconds=10, retention_seconds=3600))
    runners: list[Worker | Relay] = [*workers, relay]
    threads = [
        threading.Thread(target=r.run, kwargs={"install_signals": False}, daemon=True)
        for r in runners
    ]
    for thread in threads:
        thread.start()
    while True:
        left = remaining(dsn)
        if on_progress is not None:
            on_progress(left)
        if left == 0:
            break
        time.sleep(0.2)
    for runner in runners:
        runner.request_stop()
    for thread in threads:
        thread.join(30)
    return workers


def verify(dsn: str) -> dict[str, int]:
    """Counts that prove the demo: every receipt sent once, the rollback left nothing."""
    with db.connect(dsn, "demo") as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE receipt_sent), count(*) FROM demo_orders"
        ).fetchone()
        dead = conn.execute("SELECT count(*) FROM pgqueue.dead_jobs").fetchone()
    assert row is not None and dead is not None
    in_order = all(ids == sorted(ids) for ids in delivered.values())
    return {
        "receipts_sent": int(row[0]),
        "orders": int(row[1]),
        "dead_letters": int(dead[0]),
        "events_delivered": sum(len(ids) for ids in delivered.values()),
        "events_in_key_order": int(in_order),
    }
