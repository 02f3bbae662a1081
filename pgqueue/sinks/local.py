"""Sinks inside the process: a plain Python callable, and enqueueing a pgqueue job."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pgqueue import db
from pgqueue.names import queue_name, task_name
from pgqueue.sinks import Message


def message_args(message: Message) -> dict[str, Any]:
    """The default job arguments for a message: its id, topic, key, payload, headers."""
    return {
        "message_id": message.id,
        "topic": message.topic,
        "key": message.key,
        "payload": message.payload,
        "headers": dict(message.headers),
    }


class CallableSink:
    """Deliver by calling ``function(message)`` (sync functions run on a thread).

    A return is success; :class:`pgqueue.sinks.DeliveryError` or any exception is a failure.
    """

    def __init__(
        self, name: str, function: Callable[[Message], Any], *, max_in_flight: int = 16
    ) -> None:
        if not callable(function):
            raise TypeError("CallableSink needs a callable taking a Message")
        self.name = queue_name(name)
        self.max_in_flight = max_in_flight
        self._function = function
        self._slots: asyncio.Semaphore | None = None

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.max_in_flight)

    async def deliver(self, message: Message) -> None:
        if self._slots is None:
            raise RuntimeError(f"sink {self.name!r} used before start()")
        async with self._slots:
            if inspect.iscoroutinefunction(self._function):
                await self._function(message)
            else:
                await asyncio.to_thread(self._function, message)

    async def close(self) -> None:
        return None


class JobSink:
    """Deliver by enqueueing a pgqueue job (in the relay's database, its own transaction).

    The job's unique key is the message id, so a redelivered message finds the job that
    its first delivery created instead of enqueueing a second one while that job is live.
    """

    def __init__(
        self,
        name: str,
        dsn: str,
        task: str,
        *,
        queue: str = "default",
        args: Callable[[Message], Mapping[str, Any]] = message_args,
        schema: str | None = None,
        max_in_flight: int = 8,
    ) -> None:
        self.name = queue_name(name)
        self.max_in_flight = max_in_flight
        self._dsn = dsn
        self._task = task_name(task)
        self._queue = queue_name(queue)
        self._args = args
        self._schema = schema
        self._connections: list[Any] = []
        self._slots: asyncio.Semaphore | None = None

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.max_in_flight)

    async def deliver(self, message: Message) -> None:
        from pgqueue.enqueue import enqueue_async

        if self._slots is None:
            raise RuntimeError(f"sink {self.name!r} used before start()")
        async with self._slots:
            conn = (
                self._connections.pop()
                if self._connections
                else await db.connect_async(self._dsn, "relay-job-sink", autocommit=False)
            )
            try:
                await enqueue_async(
                    conn,
                    self._task,
                    dict(self._args(message)),
                    queue=self._queue,
                    unique_key=f"outbox:{message.id}",
                    headers={"pgqueue-message-id": message.id},
                    schema=self._schema,
                )
                await conn.commit()
            except BaseException:
                await conn.close()
                raise
            self._connections.append(conn)

    async def close(self) -> None:
        for conn in self._connections:
            await conn.close()
        self._connections.clear()
