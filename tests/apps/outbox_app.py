"""The app the outbox tests run in real `pgqueue relay` processes (and build in-process).

Routes, each present when its setting is given (environment variables for a subprocess,
keyword arguments of :func:`build_app` in-process):

- ``orders.*`` -> ``WebhookSink("webhook", $OUTBOX_TEST_HTTP_URL)``;
- ``events.*`` -> ``RedisStreamSink("redis", $OUTBOX_TEST_REDIS_URL)``, streams ``pgqueue:<topic>``;
- ``jobs.*``   -> ``JobSink("jobs", $PGQUEUE_DSN, task="handle_message", queue="outbox")``;
- ``ledger.*`` -> a ``CallableSink`` that inserts the message into the ``outbox_ledger`` table
  (the test creates it with :data:`LEDGER_DDL`) on its own autocommit connection;
- ``*``        -> the same ledger sink, only with ``OUTBOX_TEST_DEFAULT_ROUTE=1``.

Retries are fast (``RetryPolicy(base_seconds=0.05, max_seconds=0.5)``) so that tests stay short;
``$OUTBOX_TEST_MAX_ATTEMPTS`` (default 25) bounds them.

    PGQUEUE_DSN=... OUTBOX_TEST_HTTP_URL=http://127.0.0.1:8080/hook \\
        pgqueue relay --app tests.apps.outbox_app:app --lease-seconds 2 --poll-seconds 0.2
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import sys
from types import FrameType

import psycopg

from pgqueue import App, RetryPolicy
from pgqueue.sinks import Message
from pgqueue.sinks.http import WebhookSink
from pgqueue.sinks.local import CallableSink, JobSink
from pgqueue.sinks.redis_streams import RedisStreamSink

FAST_RETRY = RetryPolicy(base_seconds=0.05, max_seconds=0.5)
JOB_TASK = "handle_message"
JOB_QUEUE = "outbox"
LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS outbox_ledger (
    seq bigserial PRIMARY KEY,
    message_id uuid NOT NULL,
    topic text NOT NULL,
    key text,
    payload jsonb NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def ledger_sink(dsn: str) -> CallableSink:
    """A sink that records each delivery in ``outbox_ledger`` (committed at once)."""

    def record(message: Message) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO outbox_ledger (message_id, topic, key, payload, attempt, pid)"
                " VALUES (%s, %s, %s, %s::jsonb, %s, %s)",
                [
                    message.id,
                    message.topic,
                    message.key,
                    json.dumps(message.payload),
                    message.attempt,
                    os.getpid(),
                ],
            )

    return CallableSink("ledger", record)


def build_app(
    *,
    dsn: str | None,
    http_url: str | None = None,
    redis_url: str | None = None,
    default_route: bool = False,
    max_attempts: int = 25,
    dead_blocks_key: bool = True,
) -> App:
    """The routes described in the module docstring, for the settings given."""
    app = App()
    options = {"max_attempts": max_attempts, "retry": FAST_RETRY, "timeout": 10.0}
    if http_url:
        webhook = WebhookSink("webhook", http_url, timeout_seconds=5, max_in_flight=64)
        app.route("orders.*", webhook, dead_blocks_key=dead_blocks_key, **options)
    if redis_url:
        app.route("events.*", RedisStreamSink("redis", redis_url, timeout_seconds=5), **options)
    if dsn:
        app.route("jobs.*", JobSink("jobs", dsn, JOB_TASK, queue=JOB_QUEUE), **options)
        ledger = ledger_sink(dsn)
        app.route("ledger.*", ledger, **options)
        if default_route:
            app.route("*", ledger, **options)
    return app


app = build_app(
    dsn=os.environ.get("PGQUEUE_DSN"),
    http_url=os.environ.get("OUTBOX_TEST_HTTP_URL"),
    redis_url=os.environ.get("OUTBOX_TEST_REDIS_URL"),
    default_route=os.environ.get("OUTBOX_TEST_DEFAULT_ROUTE") == "1",
    max_attempts=int(os.environ.get("OUTBOX_TEST_MAX_ATTEMPTS", "25")),
)


def _dump_asyncio_tasks(signum: int, frame: FrameType | None) -> None:
    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:
        return
    for task in tasks:
        task.print_stack(file=sys.stderr)


if os.environ.get("OUTBOX_TEST_SUBPROCESS") == "1":
    # In a relay subprocess, `kill -USR1` dumps every thread's stack and `kill -USR2` every
    # asyncio task's (WorkerProcess.wait does both to a process that does not exit in time).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGUSR2, _dump_asyncio_tasks)
