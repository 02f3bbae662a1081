"""WebhookSink against a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest

from pgqueue.sinks import MESSAGE_ID_HEADER, DeliveryError, Message, Sink
from pgqueue.sinks.http import WebhookSink, retry_after, sign, verify_signature
from tests.servers import HttpReceiver, Reply, free_port
from tests.sinks.conftest import MakeMessage

SECRET = "s3cret-hmac-key"


@asynccontextmanager
async def started(sink: WebhookSink) -> AsyncIterator[WebhookSink]:
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


async def failure(sink: WebhookSink, make_message: MakeMessage) -> DeliveryError:
    async with started(sink):
        with pytest.raises(DeliveryError) as caught:
            await sink.deliver(make_message())
    return caught.value


def test_is_a_sink(receiver: HttpReceiver) -> None:
    assert isinstance(WebhookSink("hooks", receiver.url()), Sink)


async def test_posts_the_message_as_json_with_its_id_in_headers(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    sink = WebhookSink("hooks", receiver.url("/in?x=1"), headers={"Authorization": "Bearer t"})
    message = make_message()
    async with started(sink):
        await sink.deliver(message)

    [request] = receiver.requests
    assert (request.method, request.path) == ("POST", "/in?x=1")
    assert request.headers["content-type"] == "application/json"
    assert request.headers[MESSAGE_ID_HEADER.lower()] == message.id
    assert request.headers["idempotency-key"] == message.id
    assert request.headers["pgqueue-topic"] == "orders"
    assert request.headers["authorization"] == "Bearer t"
    assert "pgqueue-signature" not in request.headers
    assert json.loads(request.body) == {
        "id": message.id,
        "topic": "orders",
        "key": "customer-42",
        "payload": {"order": 7, "total": "12.50", "note": "crème brûlée"},
        "headers": {"trace-id": "abc123"},
        "created_at": "2024-05-01T12:30:00.123456+00:00",
    }


async def test_a_payload_read_from_the_database_goes_out_as_stored(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    # Nested past what Python's JSON decoder reads: forwarded, never decoded.
    deep = '{"n": ' + "[" * 3000 + "]" * 3000 + "}"
    stored = '{"big": 100000000000000000000000000001, "deep": ' + deep + "}"
    message = Message(
        id="m-1",
        sequence=1,
        topic="orders",
        key=None,
        headers={},
        attempt=1,
        created_at=datetime(2024, 5, 1, tzinfo=timezone.utc),
        payload_json=stored,
    )
    async with started(WebhookSink("hooks", receiver.url())) as sink:
        await sink.deliver(message)
    [request] = receiver.requests
    assert f'"payload":{stored},'.encode() in request.body
    document = json.loads(request.body.replace(deep.encode(), b"null"))
    assert document["payload"]["big"] == 100000000000000000000000000001
    assert document["headers"] == {} and document["key"] is None


async def test_method_is_configurable(receiver: HttpReceiver, make_message: MakeMessage) -> None:
    async with started(WebhookSink("hooks", receiver.url(), method="put")) as sink:
        await sink.deliver(make_message(key=None))
    assert receiver.requests[0].method == "PUT"
    assert json.loads(receiver.requests[0].body)["key"] is None


async def test_hmac_signature_verifies_only_with_the_right_secret(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    async with started(WebhookSink("hooks", receiver.url(), hmac_secret=SECRET)) as sink:
        await sink.deliver(make_message())

    [request] = receiver.requests
    header = request.headers["pgqueue-signature"]
    assert header.startswith("t=")
    assert verify_signature(SECRET, header, request.body)
    assert verify_signature(SECRET.encode(), header, request.body)
    assert not verify_signature("wrong-secret", header, request.body)
    assert not verify_signature(SECRET, header, request.body + b" ")
    signed_at = int(header.split(",")[0].removeprefix("t="))
    assert not verify_signature(SECRET, header, request.body, now=signed_at + 301)
    assert verify_signature(SECRET, header, request.body, now=signed_at + 299)


@pytest.mark.parametrize("header", ["", "t=1", "v1=ab", "t=x,v1=ab", "garbage"])
def test_malformed_signature_headers_do_not_verify(header: str) -> None:
    assert not verify_signature(SECRET, header, b"{}")


def test_signature_accepts_any_of_several_v1_entries() -> None:
    now = int(time.time())
    signed = sign(SECRET, b"{}", timestamp=now)
    assert verify_signature(SECRET, f"{signed},v1=00ff", b"{}")
    assert verify_signature(SECRET, f"t={now},v1=00ff,{signed.split(',')[1]}", b"{}")


async def test_custom_signature_header(receiver: HttpReceiver, make_message: MakeMessage) -> None:
    sink = WebhookSink("hooks", receiver.url(), hmac_secret=SECRET, signature_header="X-Sig")
    async with started(sink):
        await sink.deliver(make_message())
    request = receiver.requests[0]
    assert verify_signature(SECRET, request.headers["x-sig"], request.body)


async def test_503_is_transient_with_retry_after(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    receiver.reply(Reply(503, body=b"overloaded " * 100, headers={"Retry-After": "7"}))
    error = await failure(WebhookSink("hooks", receiver.url()), make_message)
    assert not error.is_permanent
    assert error.retry_after_seconds == 7.0
    assert "503" in str(error)
    assert ("overloaded " * 100)[:200].rstrip() in str(error)
    assert "overloaded " * 20 not in str(error)


async def test_429_with_an_http_date_retry_after(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    receiver.reply(Reply(429, headers={"Retry-After": later}))
    error = await failure(WebhookSink("hooks", receiver.url()), make_message)
    assert not error.is_permanent
    assert error.retry_after_seconds is not None
    assert 25 <= error.retry_after_seconds <= 30


@pytest.mark.parametrize("status", [500, 502, 504, 408])
async def test_server_errors_are_transient(
    receiver: HttpReceiver, make_message: MakeMessage, status: int
) -> None:
    receiver.reply(Reply(status))
    error = await failure(WebhookSink("hooks", receiver.url()), make_message)
    assert not error.is_permanent
    assert error.retry_after_seconds is None


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422])
async def test_client_errors_are_permanent(
    receiver: HttpReceiver, make_message: MakeMessage, status: int
) -> None:
    receiver.reply(Reply(status, body=b'{"error": "bad order"}'))
    error = await failure(WebhookSink("hooks", receiver.url()), make_message)
    assert error.is_permanent
    assert str(status) in str(error)
    assert "bad order" in str(error)


async def test_listed_4xx_statuses_are_retried(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    receiver.reply(Reply(409, headers={"Retry-After": "2"}), Reply(400))
    sink = WebhookSink("hooks", receiver.url(), retry_on_4xx={409})
    async with started(sink):
        with pytest.raises(DeliveryError) as conflict:
            await sink.deliver(make_message())
        with pytest.raises(DeliveryError) as bad:
            await sink.deliver(make_message())
        await sink.deliver(make_message())
    assert not conflict.value.is_permanent
    assert conflict.value.retry_after_seconds == 2.0
    assert bad.value.is_permanent


async def test_retry_on_4xx_true_retries_every_4xx(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    receiver.reply(Reply(404))
    error = await failure(WebhookSink("hooks", receiver.url(), retry_on_4xx=True), make_message)
    assert not error.is_permanent


async def test_redirects_are_permanent_and_not_followed(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    receiver.reply(Reply(301, headers={"Location": receiver.url("/elsewhere")}))
    error = await failure(WebhookSink("hooks", receiver.url()), make_message)
    assert error.is_permanent
    assert "301" in str(error)
    assert "redirect" in str(error)
    assert [r.path for r in receiver.requests] == ["/"]


async def test_timeout_is_transient(receiver: HttpReceiver, make_message: MakeMessage) -> None:
    receiver.reply(Reply(200, delay_seconds=5))
    began = time.monotonic()
    error = await failure(WebhookSink("hooks", receiver.url(), timeout_seconds=0.3), make_message)
    assert time.monotonic() - began < 2
    assert not error.is_permanent
    assert "timed out" in str(error)


async def test_connection_refused_is_transient(make_message: MakeMessage) -> None:
    sink = WebhookSink("hooks", f"http://127.0.0.1:{free_port()}/hook", timeout_seconds=2)
    error = await failure(sink, make_message)
    assert not error.is_permanent
    assert "ConnectionRefusedError" in str(error)


async def test_in_flight_requests_are_bounded(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    receiver.default = Reply(200, delay_seconds=0.1)
    async with started(WebhookSink("hooks", receiver.url(), max_in_flight=2)) as sink:
        await asyncio.gather(*(sink.deliver(make_message()) for _ in range(10)))
    assert len(receiver.requests) == 10
    assert receiver.max_concurrent == 2


async def test_waiting_for_a_slot_does_not_count_against_the_timeout(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    receiver.default = Reply(200, delay_seconds=0.15)
    sink = WebhookSink("hooks", receiver.url(), max_in_flight=1, timeout_seconds=0.5)
    async with started(sink):
        await asyncio.gather(*(sink.deliver(make_message()) for _ in range(6)))
    assert len(receiver.requests) == 6


async def test_errors_never_show_secrets(receiver: HttpReceiver, make_message: MakeMessage) -> None:
    url = receiver.url("/hook?token=querysecret").replace("//", "//user:urlsecret@", 1)
    sink = WebhookSink(
        "hooks", url, headers={"Authorization": "Bearer authsecret"}, hmac_secret=SECRET
    )
    receiver.reply(Reply(500, body=b"boom"))
    error = await failure(sink, make_message)
    refused = await failure(
        WebhookSink("hooks", url.replace(str(receiver.port), str(free_port())), hmac_secret=SECRET),
        make_message,
    )
    for text in (str(error), repr(sink), str(refused)):
        for secret in ("querysecret", "urlsecret", "authsecret", SECRET):
            assert secret not in text
    assert "/hook" in str(error)


async def test_deliver_before_start_is_an_error(
    receiver: HttpReceiver, make_message: MakeMessage
) -> None:
    with pytest.raises(RuntimeError, match="start"):
        await WebhookSink("hooks", receiver.url()).deliver(make_message())


@pytest.mark.parametrize(
    "url",
    [
        "",
        "not a url",
        "ftp://example.com/hook",
        "example.com/hook",
        "http://",
        "http:///path-only",
        "https://example.com:99999/hook",
        "https://example.com:port/hook",
        "http://[::1/hook",
    ],
)
def test_bad_urls_fail_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="'hooks': url"):
        WebhookSink("hooks", url)


@pytest.mark.parametrize(
    "options",
    [
        {"timeout_seconds": 0},
        {"max_in_flight": 0},
        {"retry_on_4xx": {500}},
        {"method": "GET"},
        {"hmac_secret": ""},
        {"headers": {"idempotency-key": "x"}},
        {"headers": {"Content-Type": "text/plain"}},
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="'hooks'"):
        WebhookSink("hooks", "https://example.com/hook", **options)


def test_retry_after_parsing() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after(None) is None
    assert retry_after("120") == 120.0
    assert retry_after(" 3 ") == 3.0
    assert retry_after("Wed, 01 May 2024 12:00:30 GMT", now=now) == 30.0
    assert retry_after("Wed, 01 May 2024 11:00:00 GMT", now=now) == 0.0
    assert retry_after("-5") is None
    assert retry_after("soon") is None
