"""A small TCP proxy on loopback for fault tests: forward, drop everything, or go half-open.

Made for PostgreSQL connections (``postgres=False`` forwards any TCP protocol, e.g. HTTP).

It runs its own asyncio loop on a thread of the test process. Every client connection is
recorded as a :class:`Connection`: when it was accepted, the PostgreSQL startup parameters it
sent (``application_name``, ``user``...; the proxy reads the startup packet before it
connects upstream, so a connection attempt is seen even while the server is down), the local
port of its upstream socket (``pg_stat_activity.client_port`` of its backend) and whether it
reached the server.

Modes, switched from the test thread:

- ``forward()``: pass bytes both ways (the default);
- ``drop()``: reset every open connection, and reset new ones as soon as they arrive;
- ``half_open(where)``: stop forwarding, in both directions, on the open connections that
  ``where(connection)`` selects (all by default), without closing them: both ends still see
  an established TCP connection that never delivers another byte (a dead NAT entry, a
  partition); ``resume(where)`` lets them flow again.

The proxy answers an ``SSLRequest`` (or a GSS encryption request) itself with ``N``, so
TLS is not offered through it; it is a loopback test tool.

Example::

    with TcpProxy("127.0.0.1", 5432) as proxy:
        dsn = proxy.dsn(real_dsn)          # same DSN, host and port of the proxy
        ...
        proxy.half_open(lambda c: c.application_name.startswith("pgqueue-worker-listen"))
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_PROTOCOL_3 = 196608
_CHUNK = 65536


@dataclass
class Connection:
    """One client connection through the proxy (read it; the proxy updates it)."""

    id: int
    accepted_at: float  # time.monotonic()
    params: dict[str, str] = field(default_factory=dict)
    upstream_port: int | None = None  # our side of the upstream socket: the backend's client_port
    outcome: str = "pending"  # forwarded, refused (drop mode), upstream_failed, cancel
    closed_at: float | None = None
    is_frozen: bool = False
    _flowing: asyncio.Event | None = field(default=None, repr=False)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list, repr=False)

    @property
    def application_name(self) -> str:
        return self.params.get("application_name", "")


class TcpProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int, *, postgres: bool = True) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.postgres = postgres  # False: any TCP protocol, no startup packet to read
        self.connections: list[Connection] = []
        self._mode = "forward"
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    # ------------------------------------------------------------ control (test thread)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def dsn(self, dsn: str) -> str:
        """``dsn`` pointed at the proxy (URL or key=value form); TLS and GSS turned off."""
        if dsn.startswith(("postgresql://", "postgres://")):
            parts = urlsplit(dsn)
            userinfo = parts.netloc.rpartition("@")[0]
            netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
            query = "&".join(q for q in [parts.query, "sslmode=disable&gssencmode=disable"] if q)
            return urlunsplit(parts._replace(netloc=netloc, query=query))
        options = conninfo_to_dict(dsn)
        options.update(host="127.0.0.1", port=str(self.port))
        options.update(sslmode="disable", gssencmode="disable")
        return make_conninfo(**options)  # type: ignore[arg-type]

    def forward(self) -> None:
        """Normal operation: new connections are forwarded, frozen ones flow again."""
        self._mode = "forward"
        self.resume()

    def drop(self) -> None:
        """Reset every open connection, and every new one until :meth:`forward`."""
        self._mode = "drop"
        self._call(self._reset_all())

    def half_open(self, where: Callable[[Connection], bool] = lambda c: True) -> list[Connection]:
        """Freeze the open connections ``where`` selects; returns them."""
        chosen = [c for c in self.open_connections() if where(c)]
        for connection in chosen:
            self._loop.call_soon_threadsafe(self._set_flowing, connection, False)
        return chosen

    def resume(self, where: Callable[[Connection], bool] = lambda c: True) -> None:
        for connection in self.open_connections():
            if where(connection):
                self._loop.call_soon_threadsafe(self._set_flowing, connection, True)

    def open_connections(self) -> list[Connection]:
        with self._lock:
            return [c for c in self.connections if c.closed_at is None]

    def attempts(self, since: float = 0.0, prefix: str = "") -> list[Connection]:
        """Connections accepted at or after ``since`` whose application_name starts with
        ``prefix``: every connection attempt a client made, whatever became of it."""
        with self._lock:
            return [
                c
                for c in self.connections
                if c.accepted_at >= since and c.application_name.startswith(prefix)
            ]

    # ------------------------------------------------------------ the loop's side

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=512)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reset_all(self) -> None:
        for connection in self.open_connections():
            for writer in connection._writers:
                writer.transport.abort()
            self._set_flowing(connection, True)  # let its pumps run into the reset and end

    def _set_flowing(self, connection: Connection, flowing: bool) -> None:
        connection.is_frozen = not flowing
        if connection._flowing is not None:
            if flowing:
                connection._flowing.set()
            else:
                connection._flowing.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            connection = Connection(id=len(self.connections), accepted_at=time.monotonic())
            self.connections.append(connection)
        connection._flowing = asyncio.Event()
        connection._flowing.set()
        connection._writers.append(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            if self._mode == "drop":
                connection.outcome = "refused"
                writer.transport.abort()
                return
            first = await self._startup_packet(reader, writer, connection) if self.postgres else b""
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                connection.outcome = "upstream_failed"
                writer.transport.abort()
                return
            connection._writers.append(upstream_writer)
            connection.upstream_port = int(upstream_writer.get_extra_info("sockname")[1])
            if self._mode == "drop":
                connection.outcome = "refused"
                return
            connection.outcome = "forwarded" if connection.outcome == "pending" else "cancel"
            if first:
                upstream_writer.write(first)
                await upstream_writer.drain()
            await asyncio.gather(
                self._pump(reader, upstream_writer, connection),
                self._pump(upstream_reader, writer, connection),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            connection.closed_at = time.monotonic()
            for side in connection._writers:
                side.transport.abort()
            self._tasks.discard(task)

    async def _startup_packet(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
    ) -> bytes:
        """Read the client's startup packet (answering TLS/GSS requests with 'N')."""
        while True:
            header = await reader.readexactly(8)
            length, code = struct.unpack("!II", header)
            if length == 8 and code in (_SSL_REQUEST, _GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            body = await reader.readexactly(length - 8)
            if code == _PROTOCOL_3:
                fields = body.split(b"\x00")
                pairs = zip(fields[0::2], fields[1::2], strict=False)
                connection.params = {
                    k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs if k
                }
            else:
                connection.outcome = "cancel_pending"  # a CancelRequest: pass it on
            return header + body

    async def _pump(
        self, source: asyncio.StreamReader, target: asyncio.StreamWriter, connection: Connection
    ) -> None:
        flowing = connection._flowing
        assert flowing is not None
        while True:
            await flowing.wait()
            data = await source.read(_CHUNK)
            if not data:
                break
            # Frozen while this chunk was on its way: hold it until the connection flows.
            await flowing.wait()
            target.write(data)
            await target.drain()
        if not target.transport.is_closing():
            target.transport.abort()
