"""The HTTP webhook sink: sends each outbox message as a JSON request, optionally HMAC-signed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
import time
from collections.abc import Collection, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from json.encoder import encode_basestring
from urllib.parse import urlsplit

from pgqueue.payload import wire_json
from pgqueue.sinks import MESSAGE_ID_HEADER, DeliveryError, Message
from pgqueue.sinks.http_client import ConnectionPool, TransportError
from pgqueue.timeouts import DeadlineWatch, watch_resolution

TOPIC_HEADER = "Pgqueue-Topic"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
SIGNATURE_HEADER = "Pgqueue-Signature"

_SET_BY_SINK = (MESSAGE_ID_HEADER, TOPIC_HEADER, IDEMPOTENCY_KEY_HEADER, "Content-Type")
_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Statuses that say "not now" rather than "never": request timeout and rate limiting.
_TRANSIENT_4XX = frozenset({408, 429})
_EXCERPT_CHARS = 200
# Enough bytes to decode 200 characters of any UTF-8 body; the rest is never read.
_EXCERPT_BYTES = 4 * _EXCERPT_CHARS


class WebhookSink:
    """Deliver outbox messages to an HTTP endpoint, one request per message.

    The request (``POST`` unless ``method`` says otherwise) carries the JSON body
    ``{"id", "topic", "key", "payload", "headers", "created_at"}`` (``created_at`` in ISO 8601)
    and the headers ``Pgqueue-Message-Id`` and ``Idempotency-Key`` (both the stable message id:
    a redelivery after a crash carries the same id, so receivers drop duplicates by it),
    ``Pgqueue-Topic`` and ``Content-Type: application/json``, plus the fixed ``headers`` given
    here (e.g. ``Authorization``).

    Outcomes: 2xx is accepted. 5xx, 408, 429, connection errors and timeouts raise a transient
    :class:`DeliveryError` carrying the ``Retry-After`` delay when the receiver sent one. Any
    other 4xx is permanent unless listed in ``retry_on_4xx`` (``True`` retries every 4xx).
    Redirects are not followed: a 3xx is permanent, so fix the URL. ``timeout_seconds`` bounds
    each request from send to response; waiting for one of the ``max_in_flight`` slots does
    not count against it.

    Signature: with ``hmac_secret`` set, each request carries
    ``Pgqueue-Signature: t=<unix seconds>,v1=<hex>`` where ``<hex>`` is the HMAC-SHA256, keyed
    with the secret's UTF-8 bytes, of ``"<t>."`` followed by the exact request body bytes. A
    receiver recomputes it over the raw body (before any JSON parsing), compares in constant
    time and rejects timestamps too far from its clock, which stops replays;
    :func:`verify_signature` does all of that. Rotate a secret by accepting either value for a
    while.

    Example::

        sink = WebhookSink("billing", "https://billing.internal/hooks/outbox",
                           hmac_secret=os.environ["BILLING_WEBHOOK_SECRET"],
                           retry_on_4xx={409})
    """

    forwards_payload_json = True

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout_seconds: float = 10,
        max_in_flight: int = 16,
        headers: Mapping[str, str] | None = None,
        hmac_secret: str | bytes | None = None,
        signature_header: str = SIGNATURE_HEADER,
        retry_on_4xx: bool | Collection[int] = False,
        method: str = "POST",
    ) -> None:
        self.name = name
        if type(max_in_flight) is not int or max_in_flight < 1:
            raise ValueError(f"sink {name!r}: max_in_flight must be an integer >= 1")
        self.max_in_flight = max_in_flight
        self._url = _checked_url(name, url)
        self.method = method.upper()
        if self.method not in _METHODS:
            raise ValueError(f"sink {name!r}: method must be one of {sorted(_METHODS)}")
        if not timeout_seconds > 0:
            raise ValueError(f"sink {name!r}: timeout_seconds must be > 0")
        self.timeout_seconds = float(timeout_seconds)
        if hmac_secret is not None and not hmac_secret:
            raise ValueError(f"sink {name!r}: hmac_secret must not be empty (or pass None)")
        self._secret = hmac_secret.encode() if isinstance(hmac_secret, str) else hmac_secret
        self.signature_header = signature_header
        self._retried_4xx = _retried_4xx(name, retry_on_4xx)
        reserved = {h.lower() for h in (*_SET_BY_SINK, signature_header)}
        clashes = {h.lower() for h in headers or {}} & reserved
        if clashes:
            raise ValueError(f"sink {name!r}: headers {sorted(clashes)} are set by the sink")
        self._headers = dict(headers or {})
        self._target = _redacted(self._url)
        self._client: ConnectionPool | None = None
        self._slots: asyncio.Semaphore | None = None
        # The request timeout, for every request at once (see DeadlineWatch).
        self._deadlines = DeadlineWatch(watch_resolution(self.timeout_seconds))
        self._watch: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"WebhookSink(name={self.name!r}, url={self._target!r})"

    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = ConnectionPool(self._url, max_connections=self.max_in_flight)
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._watch = asyncio.create_task(self._deadlines.run(), name=f"sink {self.name} deadlines")

    async def close(self) -> None:
        client, self._client, self._slots = self._client, None, None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        if client is not None:
            client.close()

    async def deliver(self, message: Message) -> None:
        client, slots = self._client, self._slots
        if client is None or slots is None:
            raise RuntimeError(f"sink {self.name!r}: call start() before deliver()")
        body = self._body(message)
        headers = {
            **self._headers,
            "Content-Type": "application/json",
            MESSAGE_ID_HEADER: message.id,
            IDEMPOTENCY_KEY_HEADER: message.id,
            TOPIC_HEADER: message.topic,
        }
        async with slots:
            if self._secret is not None:
                # Signed after the wait for a slot, so the timestamp is fresh when sent.
                headers[self.signature_header] = sign(self._secret, body)
            try:
                async with self._deadlines.limit(self.timeout_seconds):
                    status, response_headers, excerpt = await self._send(client, headers, body)
            except asyncio.TimeoutError:
                raise DeliveryError(
                    f"webhook {self.name!r}: {self.method} {self._target} timed out after "
                    f"{self.timeout_seconds:g}s"
                ) from None
            except TransportError as exc:
                raise DeliveryError(
                    f"webhook {self.name!r}: {self.method} {self._target} failed: {exc}"
                ) from None
        self._judge(status, response_headers, excerpt)

    async def _send(
        self, client: ConnectionPool, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], str]:
        response = await client.request(
            self.method, list(headers.items()), body, excerpt_bytes=_EXCERPT_BYTES
        )
        text = response.excerpt.decode("utf-8", errors="replace")[:_EXCERPT_CHARS]
        return response.status, response.headers, text

    def _judge(self, status: int, headers: Mapping[str, str], excerpt: str) -> None:
        if 200 <= status < 300:
            return
        what = f"webhook {self.name!r}: {self.method} {self._target} returned {status}"
        if 300 <= status < 400:
            location = headers.get("location", "")[:_EXCERPT_CHARS]
            raise DeliveryError(
                f"{what} redirecting to {location!r}; redirects are not followed, "
                "configure the final URL",
                is_permanent=True,
            )
        is_permanent = 400 <= status < 500 and status not in self._retried_4xx
        raise DeliveryError(
            f"{what}: {excerpt!r}",
            is_permanent=is_permanent,
            retry_after_seconds=None if is_permanent else retry_after(headers.get("retry-after")),
        )

    def _body(self, message: Message) -> bytes:
        # Assembled around the payload's JSON text, which goes out as stored: no decode and
        # encode of every payload (the relay's largest cost per message after the socket).
        try:
            payload = message.payload_json
            headers = wire_json(dict(message.headers)) if message.headers else "{}"
            key = "null" if message.key is None else encode_basestring(message.key)
            text = (
                f'{{"id":{encode_basestring(message.id)},'
                f'"topic":{encode_basestring(message.topic)},"key":{key},'
                f'"payload":{payload},"headers":{headers},'
                f'"created_at":"{message.created_at.isoformat()}"}}'
            )
            return text.encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise DeliveryError(
                f"webhook {self.name!r}: message {message.id} is not JSON-serializable: {exc}",
                is_permanent=True,
            ) from None


def sign(secret: str | bytes, body: bytes, *, timestamp: int | None = None) -> str:
    """Return the ``Pgqueue-Signature`` value for ``body``: ``t=<unix seconds>,v1=<hex>``."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str | bytes,
    header: str,
    body: bytes | str,
    tolerance_seconds: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (a ``Pgqueue-Signature`` value) signs ``body`` with ``secret``.

    ``body`` is the raw request body as received. False for a malformed header, a wrong
    signature, or a timestamp more than ``tolerance_seconds`` away from ``now`` (default: this
    machine's clock). Several ``v1=`` entries are accepted; any match verifies.

    Example::

        if not verify_signature(secret, request.headers["Pgqueue-Signature"], request.body):
            return Response(status=401)
    """
    raw = body.encode() if isinstance(body, str) else body
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        return False
    expected = _digest(secret, timestamp, raw)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse an HTTP ``Retry-After`` value (seconds or an HTTP date) into seconds from now."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


# A DNS name, an IPv4 address or an IPv6 literal (already without its brackets).
_HOST = re.compile(r"[A-Za-z0-9.\-_]+|[0-9A-Fa-f:.%]+")


def _checked_url(name: str, url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"sink {name!r}: url must be a str, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"sink {name!r}: url does not parse ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"sink {name!r}: url must start with http:// or https:// (got scheme {parts.scheme!r})"
        )
    if not parts.hostname:
        raise ValueError(f"sink {name!r}: url has no host; write e.g. https://example.com/hook")
    if any(ch.isspace() or ch in '<>"{}|\\^`' for ch in url) or not _HOST.fullmatch(
        parts.hostname.strip("[]")
    ):
        raise ValueError(
            f"sink {name!r}: url does not parse (spaces or characters not allowed in a URL)"
        )
    return url


def _redacted(url: str) -> str:
    """The URL without credentials or query string, which may carry tokens: safe for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _retried_4xx(name: str, retry_on_4xx: bool | Collection[int]) -> frozenset[int]:
    if retry_on_4xx is True:
        return frozenset(range(400, 500))
    if retry_on_4xx is False:
        return _TRANSIENT_4XX
    statuses = frozenset(retry_on_4xx)
    if not all(isinstance(s, int) and 400 <= s < 500 for s in statuses):
        raise ValueError(f"sink {name!r}: retry_on_4xx takes True, False or 4xx status codes")
    return statuses | _TRANSIENT_4XX
