"""Real `pgqueue relay` processes: SIGKILL between delivery and settlement, several at once.

Each relay is a subprocess running tests/apps/outbox_app.py against a fresh database with
2 s leases and 0.2 s polling; it delivers to the in-process HTTP receiver, a real
``redis-server`` or the jobs table. Every wait polls against a deadline.

Killing a relay "after the sink accepted a message and before it was marked sent" is made
deterministic, not lucky: the test locks ``outbox_throughput`` (which every settlement
writes to and no claim touches), so the relay's settlement blocks right after the sink
accepted; the test waits until every in-flight message has been accepted, then SIGKILLs.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.faults.conftest import WorkerProcess, wait_until
from tests.integration.test_outbox import (
    Receiver,
    check_key_order,
    outbox_is_drained,
    publish_keyed,
    query,
    scalar,
)
from tests.servers import RedisServer

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

STARTED = "started: sinks="


class Relays:
    """Starts `pgqueue relay` subprocesses for one test's database; kills leftovers."""

    def __init__(self, dsn: str, log_dir: Path) -> None:
        self.dsn = dsn
        self.log_dir = log_dir
        self.env: dict[str, str] = {}
        self.started: list[WorkerProcess] = []

    def start(self, *, wait_ready: bool = True) -> WorkerProcess:
        args = [
            sys.executable, "-m", "pgqueue.cli.main", "relay",
            "--app", "tests.apps.outbox_app:app",
            "--dsn", self.dsn,
            "--lease-seconds", "2",
            "--poll-seconds", "0.2",
            "--shutdown-grace", "5",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PGQUEUE_DSN": self.dsn,
            "PYTHONUNBUFFERED": "1",
            "OUTBOX_TEST_SUBPROCESS": "1",
            **self.env,
        }
        env.pop("DATABASE_URL", None)
        relay = WorkerProcess(args, env, self.log_dir / f"relay-{len(self.started)}.log")
        self.started.append(relay)
        if wait_ready:
            wait_until(
                lambda: STARTED in relay.log() or not relay.is_alive(),
                20,
                f"relay {relay.pid} to start",
            )
            assert STARTED in relay.log(), f"relay failed to start:\n{relay.log()}"
        return relay

    def close(self) -> None:
        for relay in self.started:
            relay.reap()


@pytest.fixture
def relays(dsn: str, tmp_path: Path) -> Iterator[Relays]:
    started = Relays(dsn, tmp_path)
    yield started
    started.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


def delivered_stats(relay: WorkerProcess) -> int:
    """``delivered`` from the relay's last log line ``relay ... stopped: RelayStats(...)``."""
    found = re.findall(r"stopped: RelayStats\(claimed=\d+, delivered=(\d+)", relay.log())
    assert found, f"no final stats in the log:\n{relay.log()}"
    return int(found[-1])


def inflight_ids(dsn: str) -> set[str]:
    rows = query(dsn, "SELECT message_id::text FROM pgqueue.outbox WHERE state = 'inflight'")
    return {r["message_id"] for r in rows}


def settlement_blocked(dsn: str) -> bool:
    return bool(
        query(
            dsn,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%%complete_messages%%'",
        )
    )


def kill_between_accept_and_settle(
    dsn: str, relay: WorkerProcess, accepted: Any, progress: int
) -> set[str]:
    """Let ``relay`` deliver ``progress`` messages, freeze its settlements, wait until every
    message it holds was accepted by the sink, SIGKILL it. Returns those message ids.

    The freeze must come while the relay still has work: callers publish several times
    ``progress`` messages, and the first check looks every few milliseconds."""
    wait_until(lambda: len(accepted()) >= progress, 20, f"{progress} deliveries", interval=0.002)
    with psycopg.connect(dsn) as lock:
        lock.execute("LOCK TABLE pgqueue.outbox_throughput IN EXCLUSIVE MODE")
        wait_until(lambda: settlement_blocked(dsn), 10, "the relay's settlement to block")
        held = wait_until(
            lambda: (ids := inflight_ids(dsn)) and ids <= set(accepted()) and ids,
            10,
            "every in-flight message to be accepted by the sink",
        )
        relay.send(signal.SIGKILL)
        relay.wait(10)
        # A backend waiting on a lock does not notice that its client died; the settlement
        # it already received would commit once the lock goes. In production the lost
        # connection ends it (TCP keepalive, client_connection_check_interval): do that.
        query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name LIKE 'pgqueue-%%'",
        )
        wait_until(
            lambda: (
                not query(
                    dsn,
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name LIKE 'pgqueue-%%'",
                )
            ),
            10,
            "the killed relay's sessions to end",
        )
        lock.rollback()
    assert inflight_ids(dsn) == held, "still in flight, not marked sent"
    return held


def redelivered(dsn: str) -> set[str]:
    rows = query(dsn, "SELECT message_id::text FROM pgqueue.outbox_delivered WHERE attempts > 1")
    return {r["message_id"] for r in rows}


# ------------------------------------------------------------------ SIGKILL


def test_http_relay_killed_after_the_receiver_accepted_delivers_again_with_the_same_id(
    dsn: str, relays: Relays
) -> None:
    keys = [f"k{i}" for i in range(5)]
    published = publish_keyed(dsn, "orders.created", keys, 40)
    with Receiver() as receiver:
        relays.env["OUTBOX_TEST_HTTP_URL"] = receiver.url("/hook")
        first = relays.start()
        held = kill_between_accept_and_settle(
            dsn, first, lambda: [d["id"] for d in receiver.deliveries()], 60
        )
        before_kill = len(receiver.deliveries())
        relays.start()
        wait_until(lambda: outbox_is_drained(dsn), 20, "the second relay to deliver the rest")
        deliveries = receiver.deliveries()

    assert all(d["header_id"] == d["id"] for d in deliveries), "Pgqueue-Message-Id is the id"
    delivered = [(d["key"], d["id"]) for d in deliveries]
    assert check_key_order(published, delivered) == {}
    seen: dict[str, int] = {}
    for _, message_id in delivered:
        seen[message_id] = seen.get(message_id, 0) + 1
    assert {m for m, n in seen.items() if n > 1} == held, "exactly the unsettled ones, again"
    assert max(seen.values()) == 2 and len(seen) == 200
    again = [d["id"] for d in deliveries[before_kill:] if d["id"] in held]
    assert sorted(again) == sorted(held), "redelivered after the kill, same message ids"
    assert redelivered(dsn) == held
    assert scalar(dsn, "SELECT count(*) AS n FROM pgqueue.outbox_delivered") == 200


def test_redis_relay_killed_after_xadd_adds_no_duplicate_entry(
    dsn: str, relays: Relays, redis_url: str
) -> None:
    keys = [f"k{i:02d}" for i in range(20)]
    published = publish_keyed(dsn, "events.created", keys, 100)
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def stream_ids() -> list[str]:
        return [fields["id"] for _, fields in client.xrange("pgqueue:events.created")]

    relays.env["OUTBOX_TEST_REDIS_URL"] = redis_url
    first = relays.start()
    held = kill_between_accept_and_settle(dsn, first, stream_ids, 150)
    relays.start()
    wait_until(lambda: outbox_is_drained(dsn), 20, "the second relay to deliver the rest")

    entries = [fields for _, fields in client.xrange("pgqueue:events.created")]
    client.close()
    assert len(entries) == 2000 == len({e["id"] for e in entries}), "no duplicate entry"
    per_key: dict[str, list[str]] = {}
    for entry in entries:
        per_key.setdefault(entry["key"], []).append(entry["id"])
    assert per_key == published, "every key in publish order, each message once"
    assert redelivered(dsn) == held, "the killed relay's messages were delivered again"


def test_job_relay_killed_after_enqueueing_creates_no_second_job(dsn: str, relays: Relays) -> None:
    keys = [f"k{i}" for i in range(5)]
    published = publish_keyed(dsn, "jobs.created", keys, 80)

    def job_message_ids() -> list[str]:
        return [r["m"] for r in query(dsn, "SELECT args->>'message_id' AS m FROM pgqueue.jobs")]

    first = relays.start()
    held = kill_between_accept_and_settle(dsn, first, job_message_ids, 30)
    relays.start()
    wait_until(lambda: outbox_is_drained(dsn), 20, "the second relay to deliver the rest")

    jobs = query(
        dsn,
        "SELECT args->>'key' AS key, args->>'message_id' AS m, unique_key FROM pgqueue.jobs"
        " ORDER BY id",
    )
    assert len(jobs) == 400 == len({j["m"] for j in jobs}), "one job per message"
    assert all(j["unique_key"] == f"outbox:{j['m']}" for j in jobs)
    assert check_key_order(published, [(j["key"], j["m"]) for j in jobs]) == {}
    assert redelivered(dsn) == held


# ------------------------------------------------------------------ several relays


def test_two_relays_keep_key_order_and_deliver_each_message_once(dsn: str, relays: Relays) -> None:
    with Receiver() as receiver:
        relays.env["OUTBOX_TEST_HTTP_URL"] = receiver.url("/hook")
        running = [relays.start(), relays.start()]
        keys = [f"key-{i:02d}" for i in range(50)]
        published = publish_keyed(dsn, "orders.created", keys, 40)
        wait_until(lambda: outbox_is_drained(dsn), 40, "2,000 messages to be delivered")
        for relay in running:
            relay.send(signal.SIGTERM)
        codes = [relay.wait(15) for relay in running]
        deliveries = receiver.deliveries(accepted_only=False)

    assert codes == [0, 0], [relay.log() for relay in running]
    assert all(d["status"] == 200 for d in deliveries)
    delivered = [(d["key"], d["id"]) for d in deliveries]
    assert len(delivered) == 2000 == len({m for _, m in delivered}), "nothing delivered twice"
    per_key: dict[str, list[str]] = {}
    for key, message_id in delivered:
        per_key.setdefault(key, []).append(message_id)
    assert per_key == published, "each key in publish order"
    shares = [delivered_stats(relay) for relay in running]
    assert sum(shares) == 2000 and min(shares) > 0, f"both relays delivered: {shares}"
    assert scalar(dsn, "SELECT count(*) AS n FROM pgqueue.outbox_delivered") == 2000
