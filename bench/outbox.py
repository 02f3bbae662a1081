"""Outbox relay throughput: N messages over K keys, published in one transaction, delivered by
one relay process to a loopback HTTP receiver and to a Redis stream; per-key order checked.

    bench/.venv/bin/python bench/outbox.py [--messages 50000] [--keys 1000]
        [--sinks memory,http,redis]

The receiver is a minimal keep-alive HTTP/1.1 server on asyncio in its own process, so the
relay (not the receiver) is what is measured. Redis is Debian's redis-server on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

import psycopg
from server import PostgresServer, free_port

import pgqueue
from pgqueue import migrate
from pgqueue.sinks.http import WebhookSink
from pgqueue.sinks.local import CallableSink


def _receiver_main(port: int, counter: Any, keys_file: str) -> None:
    """Count POSTs and remember (key, n) per message; answer 200 with keep-alive."""
    seen: list[tuple[str, int]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                message = json.loads(body)
                seen.append((message["key"], message["payload"]["n"]))
                with counter.get_lock():
                    counter.value += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            while True:
                await asyncio.sleep(0.2)
                # Written aside and renamed: the reader must never see half a file.
                with open(keys_file + ".part", "w") as out:
                    json.dump(seen, out)
                os.replace(keys_file + ".part", keys_file)

    asyncio.run(main())


def _publish(dsn: str, messages: int, keys: int) -> float:
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        pgqueue.publish_many(
            conn,
            [
                pgqueue.OutboxMessage("bench.event", {"n": n}, key=f"key-{n % keys}")
                for n in range(messages)
            ],
        )
        conn.commit()
        return time.perf_counter() - started


def _in_order(pairs: list[tuple[str, int]]) -> bool:
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, n in pairs:
        per_key[key].append(n)
    return all(ns == sorted(ns) for ns in per_key.values())


def _run_relay(app: pgqueue.App, dsn: str, done: Any, total: int) -> float:
    settings = pgqueue.RelaySettings(retention_seconds=0, concurrency=1000, batch_size=1000)
    relay = pgqueue.Relay(app, dsn, settings=settings)
    started = time.perf_counter()
    finished: list[float] = []

    def watch() -> None:
        while done() < total:
            time.sleep(0.01)
        finished.append(time.perf_counter())
        relay.request_stop()

    threading.Thread(target=watch, daemon=True).start()
    relay.run(install_signals=False)
    return finished[0] - started


def _http_relay_process(dsn: str, port: int, total: int, counter: Any) -> None:
    """One more relay process for the HTTP sink (``--relays``), stopped at ``total``."""
    app = pgqueue.App()
    app.route("*", WebhookSink("http", f"http://127.0.0.1:{port}/hook", max_in_flight=512))
    _run_relay(app, dsn, lambda: counter.value, total)


def measure(
    sink: str, server: PostgresServer, messages: int, keys: int, relays: int = 1
) -> dict[str, Any]:
    dsn = server.create_database(f"outbox_{sink}")
    migrate.upgrade(dsn)
    publish_s = _publish(dsn, messages, keys)
    app = pgqueue.App()
    result: dict[str, Any] = {"sink": sink, "relays": relays, "messages": messages, "keys": keys}
    if sink == "memory":
        got: list[tuple[str, int]] = []

        async def deliver(message: Any) -> None:
            got.append((message.key, message.payload["n"]))

        app.route("*", CallableSink("memory", deliver, max_in_flight=512))
        elapsed = _run_relay(app, dsn, lambda: len(got), messages)
        in_order = _in_order(got)
    elif sink == "http":
        port = free_port()
        counter = multiprocessing.Value("q", 0)
        keys_file = tempfile.mktemp(suffix=".json")
        receiver = multiprocessing.Process(
            target=_receiver_main, args=(port, counter, keys_file), daemon=True
        )
        receiver.start()
        time.sleep(0.5)
        app.route("*", WebhookSink("http", f"http://127.0.0.1:{port}/hook", max_in_flight=512))
        # Same (default) start method as the counter they share.
        others = [
            multiprocessing.Process(target=_http_relay_process, args=(dsn, port, messages, counter))
            for _ in range(relays - 1)
        ]
        for process in others:
            process.start()
        elapsed = _run_relay(app, dsn, lambda: counter.value, messages)
        for process in others:
            process.join(60)
        time.sleep(0.5)
        with open(keys_file) as source:
            in_order = _in_order([tuple(pair) for pair in json.load(source)])  # type: ignore[misc]
        receiver.terminate()
    else:
        from pgqueue.sinks.redis_streams import RedisStreamSink

        port = free_port()
        data = tempfile.mkdtemp()
        redis = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                data,
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        import redis as redis_client

        client = redis_client.Redis(port=port)
        app.route("*", RedisStreamSink("redis", f"redis://127.0.0.1:{port}/0", max_in_flight=512))

        def delivered() -> int:
            return int(client.xlen("pgqueue:bench.event"))

        elapsed = _run_relay(app, dsn, delivered, messages)
        entries = client.xrange("pgqueue:bench.event")
        in_order = _in_order(
            [(e[b"key"].decode(), json.loads(e[b"payload"])["n"]) for _, e in entries]
        )
        redis.terminate()
    result.update(
        publish_messages_per_s=round(messages / publish_s),
        relay_messages_per_s=round(messages / elapsed),
        per_key_order=in_order,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--sinks", default="memory,http,redis")
    parser.add_argument("--pg", type=int, default=18)
    parser.add_argument(
        "--relays", type=int, default=1, help="relay processes for the HTTP sink (default 1)"
    )
    options = parser.parse_args()
    with PostgresServer(major=options.pg) as server:
        for sink in options.sinks.split(","):
            relays = options.relays if sink == "http" else 1
            result = measure(sink, server, options.messages, options.keys, relays)
            print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
