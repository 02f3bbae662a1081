"""Workers and relays run on the event loop their settings name: uvloop (the default when it
is installed, as in the test environment) or the standard asyncio loop."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue import OutboxMessage
from pgqueue.errors import ConfigurationError
from pgqueue.lifecycle import run_event_loop
from pgqueue.sinks.local import CallableSink
from tests.integration.test_outbox import outbox_is_drained, relay_running
from tests.integration.test_outbox import wait_until as wait_for
from tests.integration.worker_runner import jobs_left, running_worker, wait_until


def _loop_kind() -> str:
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


async def _kind_of_running_loop() -> str:
    return _loop_kind()


@pytest.mark.parametrize(("setting", "expected"), [("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_a_worker_runs_its_jobs_on_the_loop_it_was_given(
    dsn: str, setting: str, expected: str
) -> None:
    app = pgqueue.App()
    loops: list[str] = []

    @app.task
    async def note_loop(job: pgqueue.Job, n: int) -> None:
        loops.append(_loop_kind())

    with psycopg.connect(dsn) as conn:
        pgqueue.enqueue_many(conn, [("note_loop", {"n": n}) for n in range(50)])
        conn.commit()
    with running_worker(app, dsn, event_loop=setting) as worker:
        wait_until(lambda: jobs_left(dsn) == 0)
    assert loops == [expected] * 50 and worker.stats.completed == 50


@pytest.mark.parametrize(("setting", "expected"), [("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_a_relay_delivers_in_key_order_on_the_loop_it_was_given(
    dsn: str, setting: str, expected: str
) -> None:
    delivered: list[tuple[str, int, str]] = []

    async def deliver(message: Any) -> None:
        delivered.append((message.key, message.payload["n"], _loop_kind()))

    app = pgqueue.App()
    app.route("*", CallableSink("record", deliver))
    with psycopg.connect(dsn) as conn:
        pgqueue.publish_many(
            conn, [OutboxMessage("t.x", {"n": n}, key=f"k{n % 3}") for n in range(60)]
        )
        conn.commit()
    with relay_running(app, dsn, event_loop=setting):
        wait_for(lambda: outbox_is_drained(dsn), 20, "the relay to deliver 60 messages")
    assert {kind for _, _, kind in delivered} == {expected}
    for key in ("k0", "k1", "k2"):
        numbers = [n for k, n, _ in delivered if k == key]
        assert numbers == sorted(numbers) and len(numbers) == 20


def test_auto_takes_uvloop_when_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert run_event_loop(_kind_of_running_loop(), "auto") == "uvloop"


def test_without_uvloop_auto_falls_back_and_asking_for_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert run_event_loop(_kind_of_running_loop(), "auto") == "asyncio"
    with pytest.raises(ConfigurationError, match=r"pip install 'pgqueue\[uvloop\]'"):
        run_event_loop(_kind_of_running_loop(), "uvloop")


def test_an_unknown_event_loop_is_refused_when_the_settings_are_made() -> None:
    with pytest.raises(ValueError, match="auto, asyncio, uvloop"):
        pgqueue.WorkerSettings(event_loop="trio")
    with pytest.raises(ValueError, match="auto, asyncio, uvloop"):
        pgqueue.RelaySettings(event_loop="trio")
