"""A small keep-alive HTTP/1.1 client for the webhook sink: one pool of connections per sink.

Webhook deliveries are many small requests to one origin, which general-purpose clients
serve at a few hundred per second here; this one writes each request in a single send and
reads just what the sink needs (status, headers, the start of the body).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

_MAX_HEAD_BYTES = 64 * 1024


class TransportError(Exception):
    """The request could not be completed: connection refused, reset, or a malformed reply."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lowercase names
    excerpt: bytes  # at most the first ``excerpt_bytes`` of the body


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """Keep-alive connections to the origin of ``url``, up to ``max_connections`` kept idle.

    The caller bounds concurrent requests (the sink holds one of its ``max_in_flight`` slots
    for each, and sizes the pool to match): a request takes an idle connection or opens one.
    """

    def __init__(self, url: str, *, max_connections: int) -> None:
        parts = urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        netloc = parts.netloc.rpartition("@")[2]
        self.host_header = netloc
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._ssl = ssl.create_default_context() if self._tls else None
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_connections

    async def _open(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(
                self._host.strip("[]"),
                self._port,
                ssl=self._ssl,
                server_hostname=self._host.strip("[]") if self._tls else None,
                limit=_MAX_HEAD_BYTES,
            )
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from None
        return _Connection(reader, writer)

    async def request(
        self, method: str, headers: list[tuple[str, str]], body: bytes, *, excerpt_bytes: int
    ) -> Response:
        head = [f"{method} {self.target} HTTP/1.1", f"Host: {self.host_header}"]
        head += [f"{name}: {value}" for name, value in headers]
        head.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        reused = bool(self._idle)
        connection = self._idle.pop() if reused else await self._open()
        try:
            response, keep = await self._exchange(connection, data, excerpt_bytes)
        except TransportError:
            connection.close()
            if not reused:
                raise
            # A kept-alive connection the server had closed meanwhile: one fresh try.
            connection = await self._open()
            try:
                response, keep = await self._exchange(connection, data, excerpt_bytes)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        if keep and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    async def _exchange(
        self, connection: _Connection, data: bytes, excerpt_bytes: int
    ) -> tuple[Response, bool]:
        reader, writer = connection.reader, connection.writer
        try:
            writer.write(data)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise TransportError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        try:
            excerpt = await self._body(reader, headers, excerpt_bytes)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise TransportError(f"reading the response body: {exc}") from None
        if excerpt is None:
            excerpt, keep = b"", False
        return Response(status, headers, excerpt), keep

    @staticmethod
    async def _body(
        reader: asyncio.StreamReader, headers: dict[str, str], excerpt_bytes: int
    ) -> bytes | None:
        """Read the whole body (keeping its start); None when the connection cannot be reused."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    return bytes(chunks[:excerpt_bytes])
                chunk = await reader.readexactly(size + 2)
                if len(chunks) < excerpt_bytes:
                    chunks += chunk[:size]
        if "content-length" in headers:
            remaining = int(headers["content-length"])
            kept = bytearray()
            while remaining > 0:
                chunk = await reader.read(min(remaining, 65536))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", remaining)
                if len(kept) < excerpt_bytes:
                    kept += chunk
                remaining -= len(chunk)
            return bytes(kept[:excerpt_bytes])
        # No length: the body runs to the end of the connection, which is then closed.
        await reader.read(excerpt_bytes)
        return None

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
