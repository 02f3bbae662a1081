"""The outbox handoff: the write that settles a delivered keyed message leases that key's next
message to the same relay (migration 0006), within the rules that keep the queue fair.

These drive MessageStore, the relay's gateway, against a real database: claim, then settle
with or without a relay to hand to, and read the rows back.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.rows import dict_row

import pgqueue
from pgqueue import OutboxMessage
from pgqueue.outcome import Outcome
from pgqueue.relay import Relay, RelaySettings, _InFlight
from pgqueue.sinks import Message
from pgqueue.sinks.local import CallableSink
from pgqueue.store import MessageStore, Settlement
from tests.database import migrate_to

LEASE = 30.0


def _publish(dsn: str, messages: list[OutboxMessage]) -> list[str]:
    with psycopg.connect(dsn) as conn, conn.transaction():
        return pgqueue.publish_many(conn, messages)


def _rows(dsn: str) -> dict[str, dict[str, Any]]:
    """Every live outbox row by message id."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT message_id::text AS m, id, key, state, attempts, relay_id, lease_token"
            " FROM pgqueue.outbox"
        ).fetchall()
    return {row["m"]: row for row in rows}


def _register_relays(dsn: str, how_many: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(how_many):
            conn.execute(
                "INSERT INTO pgqueue.processes (id, kind, host, pid, queues, concurrency)"
                " VALUES (%s, 'relay', 'test', 1, '{}', 10)",
                [uuid.uuid4()],
            )


async def _claim(store: MessageStore, relay_id: uuid.UUID, limit: int) -> list[dict[str, Any]]:
    return await store.claim_messages(limit, relay_id=relay_id, lease_seconds=LEASE)


async def _complete(store: MessageStore, claimed: list[dict[str, Any]]) -> set[int]:
    batch = Settlement()
    for row in claimed:
        batch.add(row["id"], row["lease_token"], Outcome("complete"))
    return await store.settle(batch)


async def test_settling_a_keyed_message_hands_the_key_s_next_one_to_the_relay(dsn: str) -> None:
    ids = _publish(dsn, [OutboxMessage("t.x", {"n": n}, key="k") for n in range(3)])
    store = MessageStore(dsn, "pgqueue", keep_history=False)
    relay_id = uuid.uuid4()
    store.handoff = (relay_id, LEASE)
    try:
        [head] = await _claim(store, relay_id, 10)
        assert str(head["message_id"]) == ids[0]
        written = await _complete(store, [head])
        assert written == {head["id"]}
        [second] = store.take_handed_over()
        assert store.take_handed_over() == []
        assert str(second["message_id"]) == ids[1]
        assert json.loads(second["payload"]) == {"n": 1} and second["key"] == "k"
        assert second["attempts"] == 1 and second["lease_token"] is not None
        rows = _rows(dsn)
        assert ids[0] not in rows
        assert rows[ids[1]]["state"] == "inflight" and rows[ids[1]]["relay_id"] == relay_id
        assert rows[ids[1]]["lease_token"] == second["lease_token"]
        assert rows[ids[2]]["state"] == "waiting"
        # Nothing else is claimable: the key's one message is in flight with this relay.
        assert await _claim(store, uuid.uuid4(), 10) == []
        # The handed-over lease settles like a claimed one, and hands on the third.
        assert await _complete(store, [second]) == {second["id"]}
        [third] = store.take_handed_over()
        assert str(third["message_id"]) == ids[2]
    finally:
        await store.close()


async def test_without_a_relay_to_hand_to_the_next_message_becomes_pending(dsn: str) -> None:
    ids = _publish(dsn, [OutboxMessage("t.x", {"n": n}, key="k") for n in range(2)])
    store = MessageStore(dsn, "pgqueue", keep_history=False)
    relay_id = uuid.uuid4()
    store.handoff = (relay_id, LEASE)
    store.stop_retrying()  # a shutdown began: settle writes take nothing new
    try:
        [head] = await _claim(store, relay_id, 10)
        assert await _complete(store, [head]) == {head["id"]}
        assert store.take_handed_over() == []
        row = _rows(dsn)[ids[1]]
        assert row["state"] == "pending" and row["attempts"] == 0 and row["relay_id"] is None
    finally:
        await store.close()


async def test_a_next_message_that_is_not_due_is_not_handed_over(dsn: str) -> None:
    ids = _publish(
        dsn,
        [OutboxMessage("t.x", {"n": 0}, key="k"), OutboxMessage("t.x", {"n": 1}, key="k")],
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pgqueue.outbox SET available_at = now() + interval '1 hour'"
            " WHERE message_id = %s",
            [ids[1]],
        )
    store = MessageStore(dsn, "pgqueue", keep_history=False)
    relay_id = uuid.uuid4()
    store.handoff = (relay_id, LEASE)
    try:
        [head] = await _claim(store, relay_id, 10)
        await _complete(store, [head])
        assert store.take_handed_over() == []
        assert _rows(dsn)[ids[1]]["state"] == "pending"
    finally:
        await store.close()


async def test_a_handoff_never_jumps_an_older_pending_message_of_another_key(dsn: str) -> None:
    # Commit order: a1, b1, a2. With a1 claimed and b1 still pending, a2 must queue behind
    # b1 (pending) rather than go straight to the relay that delivered a1.
    # Three transactions: one publish_many numbers its messages key by key.
    [a1], [b1], [a2] = (
        _publish(dsn, [OutboxMessage("t.x", {"n": n}, key=key)])
        for key, n in (("a", 0), ("b", 0), ("a", 1))
    )
    store = MessageStore(dsn, "pgqueue", keep_history=False)
    relay_id = uuid.uuid4()
    store.handoff = (relay_id, LEASE)
    try:
        [head] = await _claim(store, relay_id, 1)
        assert str(head["message_id"]) == a1
        await _complete(store, [head])
        assert store.take_handed_over() == []
        rows = _rows(dsn)
        assert rows[b1]["state"] == "pending" and rows[a2]["state"] == "pending"
        # Claims then take them oldest first.
        assert [str(r["message_id"]) for r in await _claim(store, relay_id, 10)] == [b1, a2]
    finally:
        await store.close()


async def test_with_two_relays_alive_about_half_of_the_next_messages_are_handed_over(
    dsn: str,
) -> None:
    keys = [f"k{i:03d}" for i in range(200)]
    _publish(dsn, [OutboxMessage("t.x", {"n": n}, key=k) for n in range(2) for k in keys])
    store = MessageStore(dsn, "pgqueue", keep_history=False)
    relay_id = uuid.uuid4()
    store.handoff = (relay_id, LEASE)
    try:
        heads = await _claim(store, relay_id, 1000)
        assert len(heads) == 200
        _register_relays(dsn, 2)
        await _complete(store, heads)
        handed = len(store.take_handed_over())
        states = [row["state"] for row in _rows(dsn).values()]
        assert states.count("inflight") == handed
        assert states.count("pending") == 200 - handed
        # A draw with chance 1/2 per key: 200 draws land within 60-140 but for a chance
        # of about 1e-8.
        assert 60 <= handed <= 140, handed
    finally:
        await store.close()


def test_a_lease_renewal_racing_the_write_of_a_delivered_message_is_not_a_lost_lease(
    dsn: str,
) -> None:
    # The heartbeat renews what the relay holds; a message delivered and deleted by its
    # settle write just before the renewal ran is missing from the renewal, yet not lost.
    relay = _idle_relay(dsn)
    relay._in_flight[42] = _InFlight(_message(42), uuid.uuid4(), None)
    relay.on_lease_lost({41, 42})
    assert relay.lost == {42}  # only the one still in flight


def test_a_message_claimed_or_handed_over_after_the_stop_began_goes_back_at_once(
    dsn: str,
) -> None:
    # A claim under way at the stop, or a settle write that handed over messages, returns
    # after the lanes closed: the message is released unattempted, not left to the grace.
    relay = _idle_relay(dsn)
    relay._stopping = True
    token = uuid.uuid4()
    message = _message(7)
    relay._start(
        {
            "id": message.sequence,
            "lease_token": token,
            "message_id": message.id,
            "topic": message.topic,
            "key": message.key,
            "payload": message.payload_json,
            "headers": {},
            "attempts": 1,
            "created_at": message.created_at,
        }
    )
    assert relay._in_flight == {}
    assert relay._settle.pending.release == [(7, token)]


def _idle_relay(dsn: str) -> Relay:
    app = pgqueue.App()
    app.route("*", CallableSink("noop", lambda message: None))
    return Relay(app, dsn, settings=RelaySettings())


def _message(sequence: int) -> Message:
    return Message(
        id=str(uuid.uuid4()),
        sequence=sequence,
        topic="t.x",
        key="k",
        payload={},
        headers={},
        attempt=1,
        created_at=datetime.now(timezone.utc),
    )


def test_the_previous_form_of_complete_messages_still_works_and_hands_nothing_over(
    dsn: str,
) -> None:
    # What a relay of the previous version calls while a deployment rolls: delete, advance.
    ids = _publish(dsn, [OutboxMessage("t.x", {"n": n}, key="k") for n in range(2)])
    relay_id = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        [(head, token)] = conn.execute(
            "SELECT id, lease_token FROM pgqueue.claim_messages(10, %s, 30)", [relay_id]
        ).fetchall()
        written = conn.execute(
            "SELECT * FROM pgqueue.complete_messages(%s::bigint[], %s::uuid[], %s::text[], false)",
            [[head], [token], ["sink"]],
        ).fetchall()
        assert written == [(head,)]
    assert _rows(dsn)[ids[1]]["state"] == "pending"


def test_advancing_a_key_by_hand_counts_what_it_moved(dsn: str) -> None:
    ids = _publish(dsn, [OutboxMessage("t.x", {"n": n}, key="k") for n in range(2)])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM pgqueue.outbox WHERE message_id = %s", [ids[0]])
        [(moved,)] = conn.execute("SELECT pgqueue.outbox_keys_advance(ARRAY['k'])").fetchall()
    assert moved == 1 and _rows(dsn)[ids[1]]["state"] == "pending"


def test_a_relay_newer_than_the_schema_stops_with_exit_code_3_instead_of_piling_up(
    empty_dsn: str,
) -> None:
    # A relay of this version against a schema at 0005: claims work, the settle write does
    # not (complete_messages lacks the handoff form). The relay must stop, not deliver on.
    migrate_to(empty_dsn, "0005_claim_hints")
    _publish(empty_dsn, [OutboxMessage("t.x", {"n": n}, key=f"k{n % 5}") for n in range(50)])
    delivered: list[int] = []
    app = pgqueue.App()
    app.route("*", CallableSink("record", lambda message: delivered.append(message.payload["n"])))
    relay = Relay(app, empty_dsn, settings=RelaySettings(lease_seconds=5, poll_seconds=0.1))
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(relay.run(install_signals=False)))
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the relay kept running against an older schema"
    assert codes == [3]
    # It stopped at its first settle write: the first claim's five heads at most.
    assert len(delivered) <= 5
