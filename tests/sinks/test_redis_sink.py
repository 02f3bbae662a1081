"""RedisStreamSink against a real redis-server on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
import redis

from pgqueue.sinks import DeliveryError, Sink
from pgqueue.sinks.redis_streams import RedisStreamSink
from tests.servers import RedisServer, free_port
from tests.sinks.conftest import MakeMessage


def entries(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    """The fields of every entry of ``stream``, oldest first."""
    rows = cast("list[tuple[str, dict[str, str]]]", client.xrange(stream))
    return [fields for _, fields in rows]


@asynccontextmanager
async def started(sink: RedisStreamSink) -> AsyncIterator[RedisStreamSink]:
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def test_is_a_sink() -> None:
    assert isinstance(RedisStreamSink("events"), Sink)


async def test_delivered_entry_has_every_field(
    redis_url: str, redis_client: redis.Redis, make_message: MakeMessage
) -> None:
    message = make_message()
    async with started(RedisStreamSink("events", redis_url)) as sink:
        await sink.deliver(message)

    [fields] = entries(redis_client, "pgqueue:orders")
    assert fields == {
        "id": message.id,
        "topic": "orders",
        "key": "customer-42",
        "payload": json.dumps(message.payload, separators=(",", ":"), ensure_ascii=False),
        "headers": '{"trace-id":"abc123"}',
        "created_at": "2024-05-01T12:30:00.123456+00:00",
    }
    assert json.loads(fields["payload"]) == message.payload


async def test_a_message_without_key_has_no_key_field(
    redis_url: str, redis_client: redis.Redis, make_message: MakeMessage
) -> None:
    async with started(RedisStreamSink("events", redis_url)) as sink:
        await sink.deliver(make_message(key=None))
    [fields] = entries(redis_client, "pgqueue:orders")
    assert "key" not in fields


async def test_a_redelivered_message_is_appended_once(
    redis_url: str, redis_client: redis.Redis, make_message: MakeMessage
) -> None:
    message, other = make_message(), make_message()
    async with started(RedisStreamSink("events", redis_url, dedupe_ttl_seconds=60)) as sink:
        await sink.deliver(message)
        await sink.deliver(message)
        await asyncio.gather(*(sink.deliver(message) for _ in range(5)))
        await sink.deliver(other)
    ids = [fields["id"] for fields in entries(redis_client, "pgqueue:orders")]
    assert ids == [message.id, other.id]
    ttl = redis_client.ttl(f"pgqueue:dedupe:pgqueue:orders:{message.id}")
    assert 0 < ttl <= 60


async def test_each_topic_gets_its_own_stream(
    redis_url: str, redis_client: redis.Redis, make_message: MakeMessage
) -> None:
    shared = make_message(topic="orders")
    async with started(RedisStreamSink("events", redis_url, stream="app:{topic}:log")) as sink:
        await sink.deliver(shared)
        await sink.deliver(make_message(topic="invoices"))
        # The same message id on another stream is not a duplicate there.
        await sink.deliver(make_message(id=shared.id, topic="refunds"))
    assert redis_client.xlen("app:orders:log") == 1
    assert redis_client.xlen("app:invoices:log") == 1
    assert redis_client.xlen("app:refunds:log") == 1
    [fields] = entries(redis_client, "app:invoices:log")
    assert fields["topic"] == "invoices"


async def test_maxlen_trims_the_stream(
    redis_url: str, redis_client: redis.Redis, make_message: MakeMessage
) -> None:
    async with started(RedisStreamSink("events", redis_url, maxlen=10)) as sink:
        for _ in range(400):
            await sink.deliver(make_message())
    # Approximate trimming drops whole internal nodes (100 entries each by default).
    assert 10 <= redis_client.xlen("pgqueue:orders") <= 200


async def test_connections_are_bounded_by_max_in_flight(
    redis_url: str, redis_client: redis.Redis, make_message: MakeMessage
) -> None:
    async with started(RedisStreamSink("events", redis_url, max_in_flight=2)) as sink:
        await asyncio.gather(*(sink.deliver(make_message()) for _ in range(50)))
        sink_clients = int(redis_client.info("clients")["connected_clients"]) - 1
    assert 1 <= sink_clients <= 2
    assert redis_client.xlen("pgqueue:orders") == 50


async def test_wrong_key_type_is_permanent_and_leaves_no_marker(
    redis_url: str, redis_client: redis.Redis, make_message: MakeMessage
) -> None:
    redis_client.set("pgqueue:orders", "not a stream")
    message = make_message()
    async with started(RedisStreamSink("events", redis_url)) as sink:
        with pytest.raises(DeliveryError) as caught:
            await sink.deliver(message)
        assert caught.value.is_permanent
        assert "WRONGTYPE" in str(caught.value)
        # Once an operator fixes the key, a requeued message is appended, not dropped.
        redis_client.delete("pgqueue:orders")
        await sink.deliver(message)
    assert redis_client.xlen("pgqueue:orders") == 1


async def test_server_down_is_transient_and_delivery_resumes(make_message: MakeMessage) -> None:
    with RedisServer() as server:
        async with started(RedisStreamSink("events", server.url, timeout_seconds=2)) as sink:
            await sink.deliver(make_message())
            server.stop()
            began = time.monotonic()
            with pytest.raises(DeliveryError) as caught:
                await sink.deliver(make_message())
            assert time.monotonic() - began < 2
            assert not caught.value.is_permanent
            server.start()
            # A fresh server has not seen the script: the sink loads it again.
            await sink.deliver(make_message())
        with redis.Redis.from_url(server.url) as client:
            assert client.xlen("pgqueue:orders") == 1


async def test_nothing_listening_is_transient(make_message: MakeMessage) -> None:
    url = f"redis://:pw-secret@127.0.0.1:{free_port()}/0"
    async with started(RedisStreamSink("events", url, timeout_seconds=1)) as sink:
        with pytest.raises(DeliveryError) as caught:
            await sink.deliver(make_message())
    assert not caught.value.is_permanent
    assert "pw-secret" not in str(caught.value)
    assert "pw-secret" not in repr(sink)


async def test_deliver_before_start_is_an_error(make_message: MakeMessage) -> None:
    with pytest.raises(RuntimeError, match="start"):
        await RedisStreamSink("events").deliver(make_message())


@pytest.mark.parametrize(
    "url",
    [
        "",
        "localhost:6379",
        "http://127.0.0.1:6379/0",
        "redis://",
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:6379/zero",
    ],
)
def test_bad_urls_fail_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="'events': url"):
        RedisStreamSink("events", url)


@pytest.mark.parametrize(
    "options",
    [
        {"stream": "pgqueue:{queue}"},
        {"stream": "pgqueue:{0}"},
        {"stream": "pgqueue:{topic"},
        {"maxlen": 0},
        {"max_in_flight": 0},
        {"dedupe_ttl_seconds": 0},
        {"timeout_seconds": -1},
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="'events'"):
        RedisStreamSink("events", **options)


def test_rediss_urls_are_accepted() -> None:
    sink = RedisStreamSink("events", "rediss://user:pw@cache.internal:6380/2")
    assert "pw" not in repr(sink)
    assert sink.stream_for("orders") == "pgqueue:orders"


async def test_a_payload_that_is_not_json_is_permanent(
    redis_url: str, redis_client: redis.Redis, make_message: MakeMessage
) -> None:
    async with started(RedisStreamSink("events", redis_url)) as sink:
        with pytest.raises(DeliveryError, match="JSON") as caught:
            await sink.deliver(make_message(payload={"when": object()}))
    assert caught.value.is_permanent
    assert redis_client.exists("pgqueue:orders") == 0
