"""The outbox end to end: publish in the caller's transaction, a relay, real sinks.

The relay runs in-process here (a thread running ``Relay.run``) against a fresh database, and
delivers to real servers on loopback: the in-process HTTP receiver of tests/servers.py and a
real ``redis-server``. Scenarios that kill relays or run several at once are in
tests/faults/test_relay_faults.py. Every wait polls against a deadline.

The helpers at the top (``Receiver``, ``key_order_violations``, ``relay_running``...) are
shared with the fault and CLI tests of the outbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any, TypeVar

import psycopg
import pytest
import redis
from psycopg.rows import dict_row
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import pgqueue
from pgqueue import App, OutboxMessage, Relay, RelaySettings
from pgqueue.sinks import Message
from pgqueue.sinks.http import WebhookSink
from pgqueue.sinks.local import CallableSink, JobSink
from pgqueue.sinks.redis_streams import RedisStreamSink
from tests.apps import outbox_app
from tests.apps.outbox_app import FAST_RETRY, LEDGER_DDL
from tests.servers import HttpReceiver, ReceivedRequest, RedisServer, Reply

T = TypeVar("T")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ------------------------------------------------------------------ shared helpers


def wait_until(
    predicate: Callable[[], T], timeout: float, message: str, interval: float = 0.05
) -> T:
    """Return the first truthy ``predicate()``; fail naming ``message`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


class Receiver(HttpReceiver):
    """The loopback HTTP receiver, answering each request by ``decide(request)``.

    ``answered`` keeps every request with the status it got, in arrival order (per key
    there is at most one delivery in flight, so arrival order is delivery order).
    """

    def __init__(self, decide: Callable[[ReceivedRequest], Reply] | None = None) -> None:
        super().__init__()
        # socketserver listens with a backlog of 5: two relays opening 100 connections at
        # once overflow it, and the kernel resets some of them. A real server has 128 or more.
        self._server.socket.listen(128)
        self.decide = decide or (lambda request: Reply())
        self.answered: list[tuple[ReceivedRequest, int]] = []

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        request = ReceivedRequest(
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=handler.rfile.read(length),
        )
        reply = self.decide(request)
        with self._lock:
            self._concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self._concurrent)
            self.requests.append(request)
            self.answered.append((request, reply.status))
            self._request_seen.notify_all()
        try:
            if reply.delay_seconds:
                self._stopping.wait(reply.delay_seconds)
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(reply.body)))
            handler.end_headers()
            handler.wfile.write(reply.body)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
        finally:
            with self._lock:
                self._concurrent -= 1

    def deliveries(self, *, accepted_only: bool = True) -> list[dict[str, Any]]:
        """Request bodies (``id``, ``topic``, ``key``, ``payload``...), in arrival order;
        ``header_id`` is the ``Pgqueue-Message-Id`` header, ``status`` the answer."""
        with self._lock:
            answered = list(self.answered)
        found = []
        for request, status in answered:
            if accepted_only and not 200 <= status < 300:
                continue
            document = json.loads(request.body)
            document["header_id"] = request.headers.get("pgqueue-message-id")
            document["status"] = status
            found.append(document)
        return found


def key_order_violations(expected: Sequence[str], received: Sequence[str]) -> list[str]:
    """How ``received`` (message ids of one key, in delivery order) breaks per-key order.

    Allowed: ``expected`` in order, where after a crash the relay may deliver a suffix of
    what it already delivered again (``1 2 3 3 4``, ``1 2 3 2 3 4``). Not allowed: a gap
    (``1 3``), a swap (``2 1``), a replay that does not run to the end of what was delivered
    (``1 2 3 2 4``), an unknown id, or a message never delivered.
    """
    index = {message_id: position for position, message_id in enumerate(expected)}
    problems: list[str] = []
    high = cursor = -1  # furthest position delivered; position of the last delivery
    for step, message_id in enumerate(received):
        position = index.get(message_id)
        if position is None:
            problems.append(f"#{step}: {message_id} was not published with this key")
            continue
        if position == cursor + 1:
            cursor = position
        elif position <= high and cursor == high:
            cursor = position  # a replay of an already delivered suffix begins
        elif position > high + 1:
            problems.append(f"#{step}: gap, position {position} after {high}")
            cursor = position
        else:
            problems.append(f"#{step}: position {position} out of order after {cursor}")
            cursor = position
        high = max(high, cursor)
    if high < len(expected) - 1:
        problems.append(f"only {high + 1} of {len(expected)} delivered")
    elif cursor != high:
        problems.append(f"ends inside a replay at position {cursor}, not {high}")
    return problems


def check_key_order(
    published: Mapping[str, Sequence[str]], delivered: Sequence[tuple[str, str]]
) -> dict[str, list[str]]:
    """Violations per key of ``delivered`` (``(key, message id)`` pairs in delivery order)."""
    per_key: dict[str, list[str]] = {key: [] for key in published}
    for key, message_id in delivered:
        per_key.setdefault(key, []).append(message_id)
    found = {}
    for key, received in per_key.items():
        problems = key_order_violations(published.get(key, []), received)
        if problems:
            found[key] = problems
    return found


def query(dsn: str, statement: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def scalar(dsn: str, statement: str, params: Any = None) -> Any:
    [row] = query(dsn, statement, params)
    return next(iter(row.values()))


def outbox_is_drained(dsn: str) -> bool:
    return scalar(dsn, "SELECT count(*) AS n FROM pgqueue.outbox") == 0


@contextmanager
def relay_running(app: App, dsn: str, **settings: Any) -> Iterator[Relay]:
    """A relay in a thread of this process, started (past its route check) when this
    yields; stopped gracefully (and its exit code checked) at the end."""
    options: dict[str, Any] = {"lease_seconds": 5.0, "poll_seconds": 0.1}
    options.update(settings)
    relay = Relay(app, dsn, settings=RelaySettings(**options))
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(relay.run(install_signals=False)), name="relay", daemon=True
    )
    thread.start()
    try:
        # Registered by its heartbeat, which starts once routes are checked and sinks open.
        wait_until(
            lambda: (
                query(dsn, "SELECT 1 FROM pgqueue.processes WHERE id = %s", [relay.id])
                or not thread.is_alive()
            ),
            10,
            "the relay to start",
        )
        assert thread.is_alive(), f"the relay stopped at start, exit code {codes}"
        yield relay
    finally:
        relay.request_stop()
        thread.join(30)
    assert not thread.is_alive(), "the relay did not stop within 30 s of request_stop()"
    assert codes == [0], f"relay exit code {codes}"


def publish_keyed(
    dsn: str, topic: str, keys: Sequence[str], per_key: int, *, batch: int = 100
) -> dict[str, list[str]]:
    """``per_key`` messages for each key, interleaved, in transactions of ``batch``;
    payload ``{"key", "n"}``. Returns the message ids per key in publish order."""
    messages = [
        OutboxMessage(topic, {"key": key, "n": n}, key=key) for n in range(per_key) for key in keys
    ]
    published: dict[str, list[str]] = {key: [] for key in keys}
    with psycopg.connect(dsn) as conn:
        for start in range(0, len(messages), batch):
            chunk = messages[start : start + batch]
            with conn.transaction():
                ids = pgqueue.publish_many(conn, chunk)
            for message, message_id in zip(chunk, ids, strict=True):
                assert message.key is not None
                published[message.key].append(message_id)
    return published


def pgqueue_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("PGQUEUE_DSN", "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "pgqueue.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=REPO_ROOT,
    )


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def ledger_dsn(dsn: str) -> str:
    query(dsn, LEDGER_DDL)
    return dsn


def webhook_app(receiver: HttpReceiver, **route: Any) -> App:
    app = App()
    sink = WebhookSink("webhook", receiver.url("/hook"), timeout_seconds=5, max_in_flight=64)
    app.route("orders.*", sink, **{"retry": FAST_RETRY, **route})
    return app


# ------------------------------------------------------------------ the order checker itself


@pytest.mark.parametrize(
    ("received", "ok"),
    [
        ("1234", True),
        ("12334", True),
        ("1232334", True),
        ("12341234", True),
        ("11234", True),
        ("1243", False),  # swap
        ("134", False),  # gap
        ("123", False),  # lost
        ("12324", False),  # replay that stops short
        ("1234123", False),  # ends inside a replay
        ("21234", False),
    ],
)
def test_key_order_checker(received: str, ok: bool) -> None:
    assert (key_order_violations("1234", received) == []) is ok


# ------------------------------------------------------------------ publish


def _sa_url(dsn: str) -> str:
    return "postgresql+psycopg://" + dsn.split("://", 1)[1]


async def _psycopg_sync(dsn: str, commit: bool) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO orders VALUES (1)")
        pgqueue.publish(conn, "orders.created", {"order": 1}, key="order-1")
        pgqueue.publish_many(conn, [OutboxMessage("orders.paid", {"order": 1})])
        conn.commit() if commit else conn.rollback()


async def _psycopg_async(dsn: str, commit: bool) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("INSERT INTO orders VALUES (1)")
        await pgqueue.publish_async(conn, "orders.created", {"order": 1}, key="order-1")
        await pgqueue.publish_many_async(conn, [OutboxMessage("orders.paid", {"order": 1})])
        await (conn.commit() if commit else conn.rollback())


async def _sa_session(dsn: str, commit: bool) -> None:
    engine = create_engine(_sa_url(dsn))
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders VALUES (1)"))
        pgqueue.publish(session, "orders.created", {"order": 1}, key="order-1")
        pgqueue.publish_many(session, [OutboxMessage("orders.paid", {"order": 1})])
        session.commit() if commit else session.rollback()
    engine.dispose()


async def _sa_async_session(dsn: str, commit: bool) -> None:
    engine = create_async_engine(_sa_url(dsn))
    async with AsyncSession(engine) as session:
        await session.execute(text("INSERT INTO orders VALUES (1)"))
        await pgqueue.publish_async(session, "orders.created", {"order": 1}, key="order-1")
        await pgqueue.publish_many_async(session, [OutboxMessage("orders.paid", {"order": 1})])
        await (session.commit() if commit else session.rollback())
    await engine.dispose()


@pytest.mark.parametrize(
    "publish_in",
    [
        pytest.param(_psycopg_sync, id="psycopg"),
        pytest.param(_psycopg_async, id="psycopg-async"),
        pytest.param(_sa_session, id="sqlalchemy-session"),
        pytest.param(_sa_async_session, id="sqlalchemy-async-session"),
    ],
)
async def test_business_row_and_message_commit_together_or_not_at_all(
    dsn: str, publish_in: Callable[[str, bool], Any]
) -> None:
    query(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")

    def counts() -> tuple[int, int]:
        return (
            scalar(dsn, "SELECT count(*) AS n FROM orders"),
            scalar(dsn, "SELECT count(*) AS n FROM pgqueue.outbox"),
        )

    await publish_in(dsn, False)
    assert counts() == (0, 0)
    # A rolled-back keyed publish leaves its key free: the next message is its head.
    await publish_in(dsn, True)
    assert counts() == (1, 2)
    states = query(dsn, "SELECT topic, key, state FROM pgqueue.outbox ORDER BY id")
    assert states == [
        {"topic": "orders.created", "key": "order-1", "state": "pending"},
        {"topic": "orders.paid", "key": None, "state": "pending"},
    ]


def test_message_ids_are_stable_uuids_fixed_at_publish(conn: psycopg.Connection[Any]) -> None:
    first = pgqueue.publish(conn, "orders.created", {"n": 1}, headers={"trace": "t-1"})
    many = pgqueue.publish_many(conn, [OutboxMessage("orders.created", {"n": i}) for i in range(3)])
    rows = conn.execute(
        "SELECT message_id::text, headers FROM pgqueue.outbox ORDER BY id"
    ).fetchall()
    assert [r[0] for r in rows] == [first, *many]
    assert rows[0][1] == {"trace": "t-1"}
    assert len(set(r[0] for r in rows)) == 4


# ------------------------------------------------------------------ late commits


def test_a_message_whose_transaction_commits_late_is_still_delivered(
    dsn: str, receiver: Receiver
) -> None:
    """Row ids are not commit-ordered: the relay must not remember "the last id seen"."""
    with relay_running(webhook_app(receiver), dsn):
        slow = psycopg.connect(dsn)
        try:
            late = pgqueue.publish(slow, "orders.created", {"who": "slow, lower id"})
            with psycopg.connect(dsn) as fast:  # commits when the block ends
                quick = pgqueue.publish(fast, "orders.created", {"who": "fast, higher id"})
            wait_until(
                lambda: scalar(dsn, "SELECT count(*) AS n FROM pgqueue.outbox_delivered") == 1,
                10,
                "the later transaction's message to be delivered and marked sent",
            )
            assert [d["id"] for d in receiver.deliveries()] == [quick]
            slow.commit()
        finally:
            slow.close()
        wait_until(lambda: len(receiver.deliveries()) == 2, 10, "the late message")

    assert [d["id"] for d in receiver.deliveries()] == [quick, late]
    ids = {
        r["message_id"]: r["id"]
        for r in query(dsn, "SELECT id, message_id::text FROM pgqueue.outbox_delivered")
    }
    assert ids[late] < ids[quick], "the late transaction's message has the lower row id"
    assert outbox_is_drained(dsn)


def test_with_one_key_a_later_publisher_waits_and_commit_order_is_delivery_order(
    dsn: str, receiver: Receiver
) -> None:
    """What we observe for one key: the second publisher blocks on the key's lock inside
    ``publish`` until the first transaction ends, so it cannot commit first; it is then
    delivered after the first (the key's order is commit order)."""
    with relay_running(webhook_app(receiver), dsn):
        first = psycopg.connect(dsn)
        second_ids: list[str] = []

        def publish_second() -> None:
            with psycopg.connect(dsn, application_name="second-publisher") as conn:
                second_ids.append(pgqueue.publish(conn, "orders.created", {"n": 2}, key="k"))

        try:
            first_id = pgqueue.publish(first, "orders.created", {"n": 1}, key="k")
            publisher = threading.Thread(target=publish_second, daemon=True)
            publisher.start()
            wait_until(
                lambda: query(
                    dsn,
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'second-publisher'"
                    " AND wait_event_type = 'Lock'",
                ),
                10,
                "the second publisher to wait on the key's lock",
            )
            assert second_ids == [] and receiver.requests == []
            first.commit()
        finally:
            first.close()
        publisher.join(10)
        assert len(second_ids) == 1
        wait_until(lambda: len(receiver.deliveries()) == 2, 10, "both messages of key k")

    assert [d["id"] for d in receiver.deliveries()] == [first_id, second_ids[0]]
    assert [d["payload"]["n"] for d in receiver.deliveries()] == [1, 2]


def test_with_one_key_a_rolled_back_open_transaction_frees_the_key(
    dsn: str, receiver: Receiver
) -> None:
    with relay_running(webhook_app(receiver), dsn):
        first = psycopg.connect(dsn)
        second_ids: list[str] = []

        def publish_second() -> None:
            with psycopg.connect(dsn) as conn:
                second_ids.append(pgqueue.publish(conn, "orders.created", {"n": 2}, key="k"))

        publisher = threading.Thread(target=publish_second, daemon=True)
        try:
            pgqueue.publish(first, "orders.created", {"n": 1}, key="k")
            publisher.start()
            wait_until(
                lambda: query(
                    dsn,
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()",
                ),
                10,
                "the second publisher to wait on the key's lock",
            )
            first.rollback()
        finally:
            first.close()
        publisher.join(10)
        wait_until(lambda: receiver.deliveries(), 10, "the second message")

    assert [d["id"] for d in receiver.deliveries()] == second_ids


# ------------------------------------------------------------------ failing receivers


def test_receiver_down_for_a_while_nothing_is_lost_and_order_holds(dsn: str) -> None:
    """503 for 2 s: retries back off, the circuit breaker opens (and holds messages back
    without using their attempts), then delivery resumes in key order."""
    outage_over = threading.Event()
    receiver = Receiver(lambda request: Reply() if outage_over.is_set() else Reply(503))
    # Four keys: fewer deliveries in flight than it takes to trip the breaker twice over
    # (see the next test for what more concurrent failures do).
    keys = [f"k{i}" for i in range(4)]
    with receiver:
        published = publish_keyed(dsn, "orders.created", keys, 25)
        started = time.monotonic()
        with relay_running(
            webhook_app(receiver), dsn, breaker_failures=3, breaker_cooldown_seconds=0.3
        ):
            wait_until(
                lambda: query(
                    dsn,
                    "SELECT 1 FROM pgqueue.outbox"
                    " WHERE last_error LIKE 'circuit open for sink webhook%%'",
                ),
                10,
                "the circuit breaker to hold messages back (last_error 'circuit open')",
            )
            wait_until(lambda: time.monotonic() - started >= 2.0, 5, "a 2 s outage")
            outage_over.set()
            refused = len(receiver.requests)
            recovered = time.monotonic()
            wait_until(lambda: outbox_is_drained(dsn), 15, "every message once the receiver is up")
            resumed_after = time.monotonic() - recovered

        delivered = [(d["key"], d["id"]) for d in receiver.deliveries()]
        assert check_key_order(published, delivered) == {}
        assert len(delivered) == 100, "no duplicates in a run without crashes"

        # Attempts are recorded per message and equal the requests really made: holding a
        # message back while the circuit is open gives its attempt back.
        requests_per_id: dict[str, int] = {}
        for request, _ in receiver.answered:
            message_id = request.headers["pgqueue-message-id"]
            requests_per_id[message_id] = requests_per_id.get(message_id, 0) + 1
        attempts = {
            r["message_id"]: r["attempts"]
            for r in query(dsn, "SELECT message_id::text, attempts FROM pgqueue.outbox_delivered")
        }
        assert attempts == requests_per_id
        assert max(attempts.values()) > 1, "the heads were retried"
        # Four key heads retried for 2 s with 0.05-0.5 s backoff would make some 40 requests
        # or more; the open breaker lets a few probes through instead.
        assert refused < 20, f"{refused} requests during the outage: the breaker did not hold"
        # The cooldown doubles with each failed probe during the outage (0.3, 0.6, 1.2, 2.4 s).
        assert resumed_after < 8, f"delivery resumed {resumed_after:.1f}s after the outage"


def test_a_short_blip_with_many_deliveries_in_flight_pauses_only_for_the_cooldown(
    dsn: str,
) -> None:
    """16 keys in flight, each head refused once (one wave of 503s), then the receiver is
    fine. The breaker opens for its 0.3 s cooldown, probes, closes: delivery resumes within
    seconds, not minutes."""
    refused = [0]
    lock = threading.Lock()

    def blip(request: ReceivedRequest) -> Reply:
        with lock:
            refused[0] += 1
            return Reply(503) if refused[0] <= 16 else Reply()

    keys = [f"k{i:02d}" for i in range(16)]
    with Receiver(blip) as receiver:
        published = publish_keyed(dsn, "orders.created", keys, 2)
        with relay_running(
            webhook_app(receiver), dsn, breaker_failures=3, breaker_cooldown_seconds=0.3
        ):
            receiver.wait_for_requests(16, 10)
            wait_until(lambda: outbox_is_drained(dsn), 8, "delivery to resume after the blip")
        delivered = [(d["key"], d["id"]) for d in receiver.deliveries()]
        assert check_key_order(published, delivered) == {}


def test_a_slow_healthy_receiver_gets_every_message_on_the_first_attempt(dsn: str) -> None:
    """Each request takes 0.3 s, well within the route's 1 s timeout; the sink sends two at
    a time. Waiting for a free slot is not the destination failing."""
    with Receiver(lambda request: Reply(delay_seconds=0.3)) as receiver:
        app = App()
        sink = WebhookSink("webhook", receiver.url("/hook"), max_in_flight=2)
        app.route("orders.*", sink, retry=FAST_RETRY, timeout=1.0)
        with psycopg.connect(dsn) as conn:
            published = [pgqueue.publish(conn, "orders.created", {"n": n}) for n in range(12)]
        with relay_running(app, dsn):
            wait_until(lambda: outbox_is_drained(dsn), 10, "12 messages, 2 at a time")
        received = [d["id"] for d in receiver.deliveries()]
        assert len(received) == 12, f"{len(received)} requests for 12 messages: duplicates"
        assert sorted(received) == sorted(published)
        attempts = query(dsn, "SELECT DISTINCT attempts FROM pgqueue.outbox_delivered")
        assert attempts == [{"attempts": 1}]
        assert receiver.max_concurrent <= 2


def _reject_poison(request: ReceivedRequest) -> Reply:
    payload = json.loads(request.body)["payload"]
    return Reply(400, body=b"bad order") if payload.get("poison") else Reply()


def test_a_rejected_message_is_dead_lettered_and_blocks_only_its_key_until_requeued(
    dsn: str,
) -> None:
    fixed = threading.Event()
    receiver = Receiver(lambda r: Reply() if fixed.is_set() else _reject_poison(r))
    with receiver:
        with psycopg.connect(dsn) as conn:
            a = [
                pgqueue.publish(conn, "orders.created", {"n": n, "poison": n == 1}, key="a")
                for n in range(4)
            ]
            b = [pgqueue.publish(conn, "orders.created", {"n": n}, key="b") for n in range(4)]
            loose = pgqueue.publish(conn, "orders.created", {"n": 0})
        with relay_running(webhook_app(receiver), dsn):
            wait_until(
                lambda: scalar(dsn, "SELECT count(*) AS n FROM pgqueue.outbox_delivered") == 6,
                10,
                "key a's head, all of key b and the keyless message",
            )
            [dead] = query(dsn, "SELECT * FROM pgqueue.outbox_dead")
            assert str(dead["message_id"]) == a[1]
            assert dead["reason"] == "rejected" and dead["attempts"] == 1
            assert dead["blocks_key"] is True and "400" in dead["last_error"]
            assert "bad order" in dead["last_error"]
            # The default policy: the later messages of key a wait, visibly.
            waiting = query(
                dsn, "SELECT message_id::text, state FROM pgqueue.outbox ORDER BY key_seq"
            )
            assert waiting == [
                {"message_id": a[2], "state": "waiting"},
                {"message_id": a[3], "state": "waiting"},
            ]
            assert [d["id"] for d in receiver.deliveries() if d["key"] == "b"] == b
            assert loose in [d["id"] for d in receiver.deliveries()]
            assert [d["id"] for d in receiver.deliveries() if d["key"] == "a"] == [a[0]]

            fixed.set()  # the receiver is fixed; the operator requeues the dead message
            requeued = pgqueue_cli("outbox", "requeue", "--id", str(dead["id"]), "--dsn", dsn)
            assert requeued.returncode == 0, requeued.stderr
            assert "requeued 1 dead message(s)" in requeued.stdout
            wait_until(lambda: outbox_is_drained(dsn), 10, "key a to finish after the requeue")

    a_requests = [(r.headers["pgqueue-message-id"], s) for r, s in receiver.answered]
    a_requests = [(m, s) for m, s in a_requests if m in a]
    assert a_requests == [(a[0], 200), (a[1], 400), (a[1], 200), (a[2], 200), (a[3], 200)]
    assert query(dsn, "SELECT * FROM pgqueue.outbox_dead") == []


def test_with_dead_blocks_key_false_the_key_goes_on(dsn: str) -> None:
    with Receiver(_reject_poison) as receiver:
        with psycopg.connect(dsn) as conn:
            a = [
                pgqueue.publish(conn, "orders.created", {"n": n, "poison": n == 0}, key="a")
                for n in range(3)
            ]
        with relay_running(webhook_app(receiver, dead_blocks_key=False), dsn):
            wait_until(lambda: outbox_is_drained(dsn), 10, "key a to go on past its dead head")

    assert [d["id"] for d in receiver.deliveries()] == a[1:]
    [dead] = query(dsn, "SELECT message_id::text, reason, blocks_key FROM pgqueue.outbox_dead")
    assert dead == {"message_id": a[0], "reason": "rejected", "blocks_key": False}


def test_a_topic_with_no_route_published_while_the_relay_runs_is_dead_lettered(
    dsn: str, receiver: Receiver
) -> None:
    with relay_running(webhook_app(receiver), dsn):
        with psycopg.connect(dsn) as conn:
            lost = pgqueue.publish(conn, "billing.created", {"n": 1}, key="x")
        [dead] = wait_until(
            lambda: query(dsn, "SELECT * FROM pgqueue.outbox_dead"), 10, "a dead letter"
        )
    assert str(dead["message_id"]) == lost
    assert dead["reason"] == "no_route" and dead["blocks_key"] is True
    assert "billing.created" in dead["last_error"]
    assert receiver.requests == []


def test_a_webhook_forwards_a_payload_python_cannot_decode_rather_than_dead_lettering_it(
    dsn: str, receiver: Receiver
) -> None:
    # Valid jsonb nested past Python's decoder: a sink that reads message.payload gets it
    # dead-lettered (tests/faults/test_hostile_input.py); the webhook sends the text on.
    query(
        dsn,
        "SELECT pgqueue.publish_messages(ARRAY['orders.created'], ARRAY['k'], ARRAY[%s::jsonb],"
        " ARRAY['{}'::jsonb], ARRAY[0.0]::float8[])",
        ('{"n": ' + "[" * 2000 + "]" * 2000 + "}",),
    )
    [row] = query(dsn, "SELECT message_id::text, payload::text AS stored FROM pgqueue.outbox")
    with relay_running(webhook_app(receiver), dsn):
        wait_until(lambda: outbox_is_drained(dsn), 10, "the message to be delivered")
    [request] = receiver.requests
    assert request.headers["pgqueue-message-id"] == row["message_id"]
    assert f'"payload":{row["stored"]},'.encode() in request.body
    assert query(dsn, "SELECT 1 FROM pgqueue.outbox_dead") == []


def test_a_default_route_delivers_any_topic(ledger_dsn: str) -> None:
    dsn = ledger_dsn
    app = outbox_app.build_app(dsn=dsn, default_route=True)
    with psycopg.connect(dsn) as conn:
        message_id = pgqueue.publish(conn, "anything.at-all", {"n": 1})
    with relay_running(app, dsn):
        wait_until(lambda: outbox_is_drained(dsn), 10, "the message to be delivered")
    rows = query(dsn, "SELECT message_id::text, topic, payload FROM outbox_ledger")
    assert rows == [{"message_id": message_id, "topic": "anything.at-all", "payload": {"n": 1}}]


# ------------------------------------------------------------------ other sinks


def test_redis_streams_end_to_end_keep_key_order_and_message_ids(dsn: str, redis_url: str) -> None:
    keys = [f"k{i:02d}" for i in range(20)]
    topic_of = {key: f"events.{'even' if i % 2 == 0 else 'odd'}" for i, key in enumerate(keys)}
    published: dict[str, list[str]] = {}
    for topic in sorted(set(topic_of.values())):
        mine = [k for k in keys if topic_of[k] == topic]
        published |= publish_keyed(dsn, topic, mine, 25)
    app = outbox_app.build_app(dsn=None, redis_url=redis_url)
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def length() -> int:
        return sum(int(client.xlen(f"pgqueue:{t}")) for t in set(topic_of.values()))

    with relay_running(app, dsn):
        wait_until(lambda: length() == 500 and outbox_is_drained(dsn), 20, "500 stream entries")

    for topic in set(topic_of.values()):
        entries = [fields for _, fields in client.xrange(f"pgqueue:{topic}")]
        assert {e["topic"] for e in entries} == {topic}
        delivered = [(e["key"], e["id"]) for e in entries]
        mine = {k: v for k, v in published.items() if topic_of[k] == topic}
        assert check_key_order(mine, delivered) == {}
        assert len(delivered) == len({m for _, m in delivered}) == 250
        for entry in entries:
            payload = json.loads(entry["payload"])
            assert published[entry["key"]][payload["n"]] == entry["id"]

    # The same message id delivered again (as after a crash) adds no entry.
    first_key = keys[0]
    message = Message(
        id=published[first_key][0],
        sequence=1,
        topic=topic_of[first_key],
        key=first_key,
        payload={"key": first_key, "n": 0},
        headers={},
        attempt=2,
        created_at=query(dsn, "SELECT now() AS now")[0]["now"],
    )

    async def deliver_again() -> None:
        sink = RedisStreamSink("redis", redis_url)
        await sink.start()
        try:
            await sink.deliver(message)
        finally:
            await sink.close()

    asyncio.run(deliver_again())
    assert length() == 500
    client.close()


def test_job_sink_turns_each_message_into_exactly_one_job(ledger_dsn: str) -> None:
    dsn = ledger_dsn
    published = publish_keyed(dsn, "jobs.created", ["a", "b", "c"], 10)
    app = outbox_app.build_app(dsn=dsn)
    with relay_running(app, dsn):
        wait_until(lambda: outbox_is_drained(dsn), 15, "30 messages to become jobs")
    jobs = query(
        dsn,
        "SELECT id, task, queue, unique_key, args, headers FROM pgqueue.jobs ORDER BY id",
    )
    assert len(jobs) == 30
    for job in jobs:
        message_id = job["args"]["message_id"]
        assert job["unique_key"] == f"outbox:{message_id}"
        assert (job["task"], job["queue"]) == (outbox_app.JOB_TASK, outbox_app.JOB_QUEUE)
        assert job["headers"]["pgqueue-message-id"] == message_id
        assert job["args"]["topic"] == "jobs.created"
    delivered = [(job["args"]["key"], job["args"]["message_id"]) for job in jobs]
    assert check_key_order(published, delivered) == {}

    # Redelivering a message while its job is live finds that job: still 30 jobs.
    first = jobs[0]["args"]
    message = Message(
        id=first["message_id"],
        sequence=1,
        topic="jobs.created",
        key=first["key"],
        payload=first["payload"],
        headers={},
        attempt=2,
        created_at=query(dsn, "SELECT now() AS now")[0]["now"],
    )

    async def deliver_again() -> None:
        sink = JobSink("jobs", dsn, outbox_app.JOB_TASK, queue=outbox_app.JOB_QUEUE)
        await sink.start()
        try:
            await sink.deliver(message)
        finally:
            await sink.close()

    asyncio.run(deliver_again())
    assert scalar(dsn, "SELECT count(*) AS n FROM pgqueue.jobs") == 30


def test_callable_sink_calls_sync_and_async_functions_and_retries_failures(dsn: str) -> None:
    seen_sync: list[Message] = []
    seen_async: list[Message] = []
    failed_once: set[str] = set()
    threads: set[str] = set()

    def sync_handler(message: Message) -> None:
        threads.add(threading.current_thread().name)
        if message.payload.get("flaky") and message.id not in failed_once:
            failed_once.add(message.id)
            raise RuntimeError("flaky receiver")
        seen_sync.append(message)

    async def async_handler(message: Message) -> None:
        await asyncio.sleep(0)
        seen_async.append(message)

    app = App()
    app.route("sync.*", CallableSink("sync-sink", sync_handler), retry=FAST_RETRY)
    app.route("async.*", CallableSink("async-sink", async_handler), retry=FAST_RETRY)
    with psycopg.connect(dsn) as conn:
        sync_ids = [
            pgqueue.publish(conn, "sync.x", {"n": n, "flaky": n == 1}, key="s", headers={"h": "1"})
            for n in range(3)
        ]
        async_ids = [pgqueue.publish(conn, "async.x", {"n": n}, key="a") for n in range(3)]
    with relay_running(app, dsn):
        wait_until(lambda: outbox_is_drained(dsn), 10, "both sinks to receive their messages")

    assert [m.id for m in seen_sync] == sync_ids
    assert [m.id for m in seen_async] == async_ids
    assert [m.attempt for m in seen_sync] == [1, 2, 1], "the flaky one succeeded on attempt 2"
    assert seen_sync[0].headers == {"h": "1"} and seen_sync[0].key == "s"
    assert seen_sync[0].topic == "sync.x" and seen_sync[0].payload == {"n": 0, "flaky": False}
    assert "relay" not in threads, "a sync callable runs on a worker thread, not the loop"


def test_a_sink_that_never_answers_times_out_on_its_route_and_the_relay_goes_on(dsn: str) -> None:
    calls: list[int] = []

    async def hangs(message: Message) -> None:
        calls.append(message.attempt)
        if message.payload.get("hang"):
            await asyncio.sleep(60)

    app = App()
    app.route("slow.*", CallableSink("slow", hangs), retry=FAST_RETRY, max_attempts=2, timeout=0.3)
    with psycopg.connect(dsn) as conn:
        stuck = pgqueue.publish(conn, "slow.x", {"hang": True}, key="k1")
        fine = [pgqueue.publish(conn, "slow.x", {"n": n}, key="k2") for n in range(3)]
    with relay_running(app, dsn):
        # Well under the 60 s the sink would hang: each attempt was cut at 0.3 s.
        wait_until(lambda: outbox_is_drained(dsn), 15, "the hanging message to be given up")
    [dead] = query(
        dsn, "SELECT message_id::text, reason, attempts, last_error FROM pgqueue.outbox_dead"
    )
    assert dead["message_id"] == stuck and dead["reason"] == "max_attempts"
    assert dead["attempts"] == 2
    assert "did not answer within its route's timeout of 0.3s" in dead["last_error"]
    delivered = query(dsn, "SELECT message_id::text FROM pgqueue.outbox_delivered")
    assert sorted(d["message_id"] for d in delivered) == sorted(fine)
    assert calls.count(1) == 4 and calls.count(2) == 1  # the stuck one was tried twice


# ------------------------------------------------------------------ bad input


def test_a_payload_that_is_not_json_raises_type_error_naming_the_path(
    conn: psycopg.Connection[Any],
) -> None:
    with pytest.raises(TypeError, match=r"payload\['items'\]\[1\] is a object"):
        pgqueue.publish(conn, "orders.created", {"items": [1, object()]})
    with pytest.raises(TypeError, match=r"messages\[1\]: payload\['when'\] is a set"):
        pgqueue.publish_many(
            conn,
            [OutboxMessage("orders.created", {"ok": 1}), OutboxMessage("orders.x", {"when": {1}})],
        )
    with pytest.raises(TypeError, match="headers must map str to str"):
        pgqueue.publish(conn, "orders.created", {}, headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="key must be a str"):
        pgqueue.publish(conn, "orders.created", {}, key=5)  # type: ignore[arg-type]
    # Nothing reached the database, and the transaction is still usable.
    assert conn.execute("SELECT count(*) FROM pgqueue.outbox").fetchone() == (0,)


async def test_publish_async_checks_the_payload_too(aconn: psycopg.AsyncConnection[Any]) -> None:
    with pytest.raises(TypeError, match=r"payload\['at'\] is a bytes"):
        await pgqueue.publish_async(aconn, "orders.created", {"at": b"x"})
    with pytest.raises(TypeError, match="is async"):
        pgqueue.publish(aconn, "orders.created", {})


@pytest.mark.parametrize("topic", ["", "orders created", "orders/created", "é", "x" * 49, "a*"])
def test_an_invalid_topic_raises_value_error(conn: psycopg.Connection[Any], topic: str) -> None:
    with pytest.raises(ValueError, match="invalid topic name"):
        pgqueue.publish(conn, topic, {})


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("not a url", "must start with http"),
        ("ftp://example.com/hook", "must start with http"),
        ("http:///hook", "has no host"),
        ("http://example.com:99999/hook", "does not parse"),
        ("http://[::1/hook", "does not parse"),
        ("http://example.com:abc/hook", "does not parse"),
        ("http://exa mple.com/hook", "does not parse"),
    ],
)
def test_a_webhook_with_a_bad_url_fails_when_the_app_is_built(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        outbox_app.build_app(dsn=None, http_url=url)
