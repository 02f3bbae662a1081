"""Real servers on loopback for tests: an in-process HTTP receiver and a redis-server process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

REDIS_SERVER = "/usr/bin/redis-server"


@dataclass(frozen=True)
class Reply:
    """What the receiver answers to one request; ``delay_seconds`` passes before it answers."""

    status: int = 200
    body: bytes = b"ok"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


class _Server(ThreadingHTTPServer):
    # Several relays open a hundred connections at once; the default backlog of 5 resets some.
    request_queue_size = 128
    daemon_threads = True


class HttpReceiver:
    """A ThreadingHTTPServer on 127.0.0.1 that records requests and answers as programmed.

    ``reply(*replies)`` queues answers, used in order; once they run out, ``default`` answers.
    ``max_concurrent`` is the most requests it was ever handling at the same time.

    Example::

        with HttpReceiver() as receiver:
            receiver.reply(Reply(503, headers={"Retry-After": "7"}))
            ...  # POST to receiver.url("/hook")
            assert receiver.requests[0].method == "POST"
    """

    def __init__(self, default: Reply = Reply()) -> None:
        self.default = default
        self.requests: list[ReceivedRequest] = []
        self.max_concurrent = 0
        self._replies: list[Reply] = []
        self._concurrent = 0
        self._lock = threading.Lock()
        self._request_seen = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval, so shutdown() returns at once rather than after 0.5 s.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def reply(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def wait_for_requests(self, count: int, timeout_seconds: float = 5.0) -> list[ReceivedRequest]:
        """Block until ``count`` requests arrived (their reply may still be pending)."""
        with self._request_seen:
            if not self._request_seen.wait_for(
                lambda: len(self.requests) >= count, timeout_seconds
            ):
                raise TimeoutError(f"got {len(self.requests)} requests, expected {count}")
            return list(self.requests)

    def __enter__(self) -> HttpReceiver:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopping.set()  # wakes handlers sleeping in a delay
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        with self._lock:
            self._concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self._concurrent)
            self.requests.append(
                ReceivedRequest(
                    method=handler.command,
                    path=handler.path,
                    headers={k.lower(): v for k, v in handler.headers.items()},
                    body=body,
                )
            )
            reply = self._replies.pop(0) if self._replies else self.default
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
            handler.close_connection = True  # the client gave up (timeout test)
        finally:
            with self._lock:
                self._concurrent -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                receiver._handle(self)

            do_PUT = do_PATCH = do_GET = do_DELETE = do_POST

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def free_port() -> int:
    """A TCP port nothing listens on right now (another process may still take it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1: no persistence, its own temp directory.

    ``start()`` returns once it answers PING; ``stop()`` kills it (the port stays reserved in
    ``url``, so ``start()`` again brings the same address back).

    Example::

        with RedisServer() as server:
            client = redis.Redis.from_url(server.url)
    """

    def __init__(self, executable: str = REDIS_SERVER) -> None:
        if shutil.which(executable) is None:
            raise RuntimeError(f"{executable} not found: apt-get install redis-server")
        self.executable = executable
        self.port = free_port()
        self._directory = tempfile.TemporaryDirectory(prefix="pgqueue-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def _log_path(self) -> str:
        return os.path.join(self._directory.name, "redis.log")

    def start(self, timeout_seconds: float = 10.0) -> None:
        if self._process is not None:
            return
        command = [
            self.executable,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", self._directory.name),
            *("--daemonize", "no", "--logfile", self._log_path),
        ]
        # A log file, not a pipe: a pipe nobody reads fills up and blocks the server.
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._process = process
        deadline = time.monotonic() + timeout_seconds
        while not self._answers_ping():
            if process.poll() is not None or time.monotonic() > deadline:
                output = self._kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{output}")
            time.sleep(0.02)

    def stop(self) -> None:
        self._kill()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._kill()
        self._directory.cleanup()

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _kill(self) -> str:
        process, self._process = self._process, None
        if process is None:
            return ""
        process.kill()
        process.wait(timeout=10)
        try:
            with open(self._log_path, encoding="utf-8", errors="replace") as log:
                return log.read()
        except OSError:
            return ""
