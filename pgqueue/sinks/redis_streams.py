"""The Redis Streams sink: appends each outbox message to a stream, dropping redeliveries."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from pgqueue.payload import wire_json
from pgqueue.sinks import DeliveryError, Message

# A Lua script runs atomically, so check-then-append-then-mark cannot race with another relay.
# The marker is written after XADD, not before: a script that fails halfway keeps its earlier
# writes, and a marker left by a failed XADD would silently drop the message on every retry.
# KEYS: dedupe marker, stream. ARGV: ttl seconds, maxlen ('' for none), then field, value, ...
_APPEND_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local command = {'XADD', KEYS[2]}
if ARGV[2] ~= '' then
  table.insert(command, 'MAXLEN')
  table.insert(command, '~')
  table.insert(command, ARGV[2])
end
table.insert(command, '*')
for i = 3, #ARGV do
  table.insert(command, ARGV[i])
end
local entry = redis.call(unpack(command))
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return entry
"""

# Error replies that mean "not now" (failover, busy script, loading): worth a retry. Redis
# names its errors by a leading code word, as PostgreSQL does with SQLSTATE.
_TRANSIENT_REPLIES = (
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)
_TRANSIENT_CODES = frozenset({"BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "READONLY"})


class RedisStreamSink:
    """Append outbox messages to Redis streams (``XADD``), one stream per topic by default.

    Each entry has the fields ``id`` (the stable message id), ``topic``, ``key`` (absent when
    the message has no key), ``payload`` and ``headers`` (JSON text) and ``created_at``
    (ISO 8601). ``stream`` is a template formatted with ``topic``. ``maxlen`` trims the stream
    approximately (``MAXLEN ~``) as entries are added.

    Effectively-once into the stream: the append runs in a Lua script that first checks the
    marker ``pgqueue:dedupe:<stream>:<message id>`` and, after the ``XADD``, sets it with a
    ``dedupe_ttl_seconds`` expiry. A message the relay delivers again (after a crash between
    the append and marking it sent) is dropped by Redis within that window. The marker is per
    stream, so one message routed to two streams reaches both. ``deliver`` returns once Redis
    replied; durability beyond that is Redis's ``appendonly``/replication configuration.

    Connection errors and timeouts (``timeout_seconds`` per connect and per reply) are
    transient; an error reply such as ``WRONGTYPE`` (the stream key holds another type) is
    permanent, except replies that mean "try later" (``READONLY``, ``BUSY``, ``LOADING``...).

    Example::

        sink = RedisStreamSink("events", "redis://cache.internal:6379/0",
                               stream="app:{topic}", maxlen=1_000_000)
    """

    forwards_payload_json = True

    def __init__(
        self,
        name: str,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream: str = "pgqueue:{topic}",
        maxlen: int | None = None,
        max_in_flight: int = 64,
        dedupe_ttl_seconds: int = 86400,
        timeout_seconds: float = 5,
    ) -> None:
        self.name = name
        self._url = _checked_url(name, url)
        try:
            stream.format(topic="topic")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"sink {name!r}: stream must be a template using only {{topic}}, "
                f"got {stream!r} ({type(exc).__name__}: {exc})"
            ) from None
        self.stream = stream
        self.max_in_flight = _positive_int(name, "max_in_flight", max_in_flight)
        self.maxlen = None if maxlen is None else _positive_int(name, "maxlen", maxlen)
        self.dedupe_ttl_seconds = _positive_int(name, "dedupe_ttl_seconds", dedupe_ttl_seconds)
        if not timeout_seconds > 0:
            raise ValueError(f"sink {name!r}: timeout_seconds must be > 0")
        self.timeout_seconds = float(timeout_seconds)
        self._target = _redacted(self._url)
        self._pool: BlockingConnectionPool | None = None
        self._client: Redis | None = None
        self._append_once: AsyncScript | None = None
        self._slots: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"RedisStreamSink(name={self.name!r}, url={self._target!r})"

    def stream_for(self, topic: str) -> str:
        """The stream key messages of ``topic`` go to."""
        return self.stream.format(topic=topic)

    async def start(self) -> None:
        if self._client is not None:
            return
        # One retry, no backoff: enough to replace a pooled connection the server closed while
        # idle. The relay owns real retries; a retried append is harmless thanks to the marker.
        self._pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=self.max_in_flight,
            timeout=self.timeout_seconds,
            socket_timeout=self.timeout_seconds,
            socket_connect_timeout=self.timeout_seconds,
            retry=Retry(NoBackoff(), 1),
        )
        self._client = Redis(connection_pool=self._pool)
        # EVALSHA, loading the script on the first NOSCRIPT (e.g. after a server restart).
        self._append_once = self._client.register_script(_APPEND_ONCE)
        self._slots = asyncio.Semaphore(self.max_in_flight)

    async def close(self) -> None:
        client, pool = self._client, self._pool
        self._client, self._pool, self._slots, self._append_once = None, None, None, None
        if client is not None:
            await client.aclose()
        if pool is not None:
            await pool.aclose()

    async def deliver(self, message: Message) -> None:
        script, slots = self._append_once, self._slots
        if script is None or slots is None:
            raise RuntimeError(f"sink {self.name!r}: call start() before deliver()")
        stream = self.stream_for(message.topic)
        arguments: list[str | int] = [self.dedupe_ttl_seconds, self.maxlen or ""]
        for field, value in self._fields(message).items():
            arguments += [field, value]
        keys = [f"pgqueue:dedupe:{stream}:{message.id}", stream]
        async with slots:
            try:
                await script(keys=keys, args=arguments)
            except redis_errors.ResponseError as exc:
                raise DeliveryError(
                    self._describe(stream, exc), is_permanent=not _is_transient_reply(exc)
                ) from None
            except redis_errors.RedisError as exc:
                raise DeliveryError(self._describe(stream, exc)) from None

    def _fields(self, message: Message) -> dict[str, str]:
        try:
            payload = message.payload_json
            headers = wire_json(dict(message.headers))
        except (TypeError, ValueError) as exc:
            raise DeliveryError(
                f"redis sink {self.name!r}: message {message.id} is not JSON-serializable: {exc}",
                is_permanent=True,
            ) from None
        fields = {"id": message.id, "topic": message.topic}
        if message.key is not None:
            fields["key"] = message.key
        fields |= {
            "payload": payload,
            "headers": headers,
            "created_at": message.created_at.isoformat(),
        }
        return fields

    def _describe(self, stream: str, exc: redis_errors.RedisError) -> str:
        return (
            f"redis sink {self.name!r}: XADD to {stream!r} at {self._target} failed: "
            f"{type(exc).__name__}: {exc}"
        )


def _is_transient_reply(exc: redis_errors.ResponseError) -> bool:
    if isinstance(exc, _TRANSIENT_REPLIES):
        return True
    # Redis 7 passes the code of a command failing inside a script through as the first word
    # ("BUSY ...", "WRONGTYPE ... script: ..."); redis-py maps only some codes to classes.
    words = str(exc).split()
    return bool(words) and (words[0] in _TRANSIENT_CODES)


def _checked_url(name: str, url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"sink {name!r}: url must be a str, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"sink {name!r}: url does not parse ({exc})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"sink {name!r}: url must start with redis:// or rediss:// (got scheme "
            f"{parts.scheme!r})"
        )
    if not parts.hostname:
        raise ValueError(f"sink {name!r}: url has no host; write e.g. redis://127.0.0.1:6379/0")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"sink {name!r}: url path must be a database number, e.g. /0")
    return url


def _redacted(url: str) -> str:
    """The URL without credentials: safe for logs and error messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _positive_int(name: str, field: str, value: int) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"sink {name!r}: {field} must be an integer >= 1, got {value!r}")
    return value
