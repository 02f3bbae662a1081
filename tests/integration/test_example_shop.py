"""The example shop of docker-compose.yml, run as compose runs it: web app, worker and relay
as separate processes on a real database (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.servers import free_port

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop"


def start(dsn: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        cwd=SHOP,
        env={**os.environ, "PGQUEUE_DSN": dsn, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def request(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    call = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(call, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(predicate: Any, timeout_seconds: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the shop did not get there in time")
        time.sleep(0.05)


def counts(dsn: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM shop_orders), "
            "(SELECT count(*) FROM pgqueue.jobs WHERE task = 'confirm_order'), "
            "(SELECT count(*) FROM pgqueue.outbox WHERE topic = 'order.created')"
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


@pytest.fixture
def shop(dsn: str) -> Iterator[tuple[int, dict[str, str]]]:
    port = free_port()
    env = {
        "SHOP_WEBHOOK_URL": f"http://127.0.0.1:{port}/hooks/order-created",
        "SHOP_WEBHOOK_SECRET": "test-secret",
    }
    migrated = subprocess.run(
        [sys.executable, "shop.py", "migrate"],
        cwd=SHOP,
        env={**os.environ, "PGQUEUE_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr
    web = start(dsn, sys.executable, "shop.py", "serve", "--port", str(port), env=env)
    try:
        assert web.stdout is not None
        assert "listening" in web.stdout.readline()
        yield port, env
    finally:
        web.terminate()
        web.wait(timeout=10)


def test_an_order_its_job_and_its_message_commit_together_and_flow_through(
    dsn: str, shop: tuple[int, dict[str, str]]
) -> None:
    port, env = shop
    status, placed = request(port, "POST", "/orders", {"customer": "ada", "amount_cents": 1250})
    assert status == 201, placed
    assert counts(dsn) == (1, 1, 1)
    # Bad input: a clear message, and nothing written.
    for body, says in (
        (b"not json", "send a JSON object"),
        ({"customer": "", "amount_cents": 5}, "customer must be"),
        ({"customer": "bob", "amount_cents": -5}, "amount_cents must be"),
        ({"customer": "bob", "amount_cents": True}, "amount_cents must be"),
    ):
        status, answer = request(port, "POST", "/orders", body)
        assert status == 400 and says in answer["error"], answer
    assert counts(dsn) == (1, 1, 1)
    assert request(port, "GET", f"/orders/{placed['order_id']}")[1]["status"] == "placed"
    # The worker confirms the order with its ack; the relay calls the shop's signed webhook.
    bin_dir = Path(sys.executable).parent
    worker = start(dsn, str(bin_dir / "pgqueue"), "worker", "--app", "shop:app", env=env)
    relay = start(dsn, str(bin_dir / "pgqueue"), "relay", "--app", "shop:app", env=env)
    try:
        for n in range(20):
            status, _ = request(port, "POST", "/orders", {"customer": f"c{n}", "amount_cents": 100})
            assert status == 201
        wait_until(lambda: counts(dsn) == (21, 0, 0))
        with psycopg.connect(dsn) as conn:
            statuses = conn.execute("SELECT DISTINCT status FROM shop_orders").fetchall()
            events = conn.execute("SELECT count(DISTINCT order_id) FROM shop_order_events")
            assert statuses == [("confirmed",)]
            assert events.fetchone() == (21,)
        shown = request(port, "GET", f"/orders/{placed['order_id']}")[1]
        assert shown["status"] == "confirmed" and shown["events_received"] == 1
    finally:
        for process in (worker, relay):
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=30)[0] for process in (worker, relay)]
    assert (worker.returncode, relay.returncode) == (0, 0), outputs
    # A forged webhook call is refused.
    status, answer = request(port, "POST", "/hooks/order-created", {"id": "x"})
    assert status == 401 and "Pgqueue-Signature" in answer["error"]
