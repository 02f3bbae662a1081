"""A small shop: a web app that writes an order, a job and an outbox message in one transaction.

Run by ``docker-compose.yml`` (web, worker and relay services), or by hand:

    python examples/shop/shop.py migrate          # the shop's own tables
    python examples/shop/shop.py serve --port 8000
    cd examples/shop && pgqueue worker --app shop:app
    cd examples/shop && pgqueue relay --app shop:app

    curl -s localhost:8000/orders -d '{"customer": "ada", "amount_cents": 1250}'
    curl -s localhost:8000/orders/1

``POST /orders`` commits the order row, a ``confirm_order`` job and an ``order.created``
message together, or none of them. The worker confirms the order in the transaction that
acknowledges the job. The relay delivers the message to ``SHOP_WEBHOOK_URL`` (by default this
web app's own ``/hooks/order-created``), signed with ``SHOP_WEBHOOK_SECRET``; the hook stores
each message id once, because delivery is at least once.

Configuration: ``PGQUEUE_DSN`` (or ``DATABASE_URL``), ``SHOP_WEBHOOK_URL``,
``SHOP_WEBHOOK_SECRET``. Stdlib HTTP server, one database connection per request: an
example, not a production web stack.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socketserver
import sys
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg

import pgqueue
from pgqueue.sinks.http import WebhookSink, verify_signature

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS shop_orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer text NOT NULL,
    amount_cents integer NOT NULL CHECK (amount_cents > 0),
    status text NOT NULL DEFAULT 'placed',
    placed_at timestamptz NOT NULL DEFAULT now(),
    confirmed_at timestamptz
);
CREATE TABLE IF NOT EXISTS shop_order_events (
    message_id uuid PRIMARY KEY,
    order_id bigint NOT NULL,
    topic text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
"""
MAX_BODY_BYTES = 64 * 1024


def dsn() -> str:
    found = os.environ.get("PGQUEUE_DSN") or os.environ.get("DATABASE_URL")
    if not found:
        sys.exit("shop: set PGQUEUE_DSN (or DATABASE_URL) to the shop's PostgreSQL")
    return found


def webhook_secret() -> str:
    return os.environ.get("SHOP_WEBHOOK_SECRET", "shop-dev-secret")


app = pgqueue.App()
app.route(
    "order.created",
    WebhookSink(
        "shop-hooks",
        os.environ.get("SHOP_WEBHOOK_URL", "http://127.0.0.1:8000/hooks/order-created"),
        hmac_secret=webhook_secret(),
        timeout_seconds=5,
    ),
)


@app.task(queue="shop", max_attempts=10, timeout=30)
def confirm_order(job: pgqueue.Job, order_id: int) -> None:
    """Confirm the order; the update commits with the job's acknowledgement, or not at all."""
    with job.transaction() as conn:
        conn.execute(
            "UPDATE shop_orders SET status = 'confirmed', confirmed_at = now() "
            "WHERE id = %s AND status = 'placed'",
            (order_id,),
        )


class BadRequest(Exception):
    """The request cannot be served as sent; the message says what to change."""


def parse_order(body: bytes) -> tuple[str, int]:
    try:
        document = json.loads(body)
    except ValueError:
        raise BadRequest('send a JSON object: {"customer": "...", "amount_cents": 1250}') from None
    if not isinstance(document, dict):
        raise BadRequest('send a JSON object: {"customer": "...", "amount_cents": 1250}')
    customer, amount = document.get("customer"), document.get("amount_cents")
    if not isinstance(customer, str) or not 0 < len(customer.strip()) <= 200 or "\x00" in customer:
        raise BadRequest("customer must be a non-empty string of at most 200 characters")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount < 2**31:
        raise BadRequest("amount_cents must be a positive whole number of cents")
    return customer.strip(), amount


def place_order(body: bytes) -> tuple[int, dict[str, Any]]:
    customer, amount = parse_order(body)
    with psycopg.connect(dsn()) as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO shop_orders (customer, amount_cents) VALUES (%s, %s) RETURNING id",
            (customer, amount),
        ).fetchone()
        assert row is not None
        order_id = int(row[0])
        job_id = pgqueue.enqueue(conn, "confirm_order", {"order_id": order_id}, queue="shop")
        message_id = pgqueue.publish(
            conn,
            topic="order.created",
            key=str(order_id),
            payload={"order_id": order_id, "customer": customer, "amount_cents": amount},
        )
    return 201, {"order_id": order_id, "job_id": job_id, "message_id": str(message_id)}


def show_order(order_id: int) -> tuple[int, dict[str, Any]]:
    with psycopg.connect(dsn()) as conn:
        row = conn.execute(
            "SELECT o.id, o.customer, o.amount_cents, o.status, "
            "       (SELECT count(*) FROM shop_order_events AS e WHERE e.order_id = o.id) "
            "FROM shop_orders AS o WHERE o.id = %s",
            (order_id,),
        ).fetchone()
    if row is None:
        return 404, {"error": f"no order {order_id}"}
    keys = ("order_id", "customer", "amount_cents", "status", "events_received")
    return 200, dict(zip(keys, row, strict=True))


def receive_hook(body: bytes, signature: str) -> tuple[int, dict[str, Any]]:
    if not verify_signature(webhook_secret(), signature, body):
        return 401, {"error": "bad or missing Pgqueue-Signature"}
    message = json.loads(body)
    with psycopg.connect(dsn()) as conn, conn.transaction():
        # Delivery is at least once: the message id makes a redelivery a no-op.
        conn.execute(
            "INSERT INTO shop_order_events (message_id, order_id, topic) VALUES (%s, %s, %s) "
            "ON CONFLICT (message_id) DO NOTHING",
            (message["id"], int(message["payload"]["order_id"]), message["topic"]),
        )
    return 200, {"ok": True}


def route(method: str, path: str, body: bytes, environ: dict[str, Any]) -> tuple[int, Any]:
    if method == "POST" and path == "/orders":
        return place_order(body)
    if method == "GET" and (match := re.fullmatch(r"/orders/(\d{1,18})", path)):
        return show_order(int(match.group(1)))
    if method == "POST" and path == "/hooks/order-created":
        return receive_hook(body, environ.get("HTTP_PGQUEUE_SIGNATURE", ""))
    if method == "GET" and path == "/health":
        return 200, {"ok": True}
    return 404, {"error": f"no route for {method} {path}"}


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length > MAX_BODY_BYTES:
            raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes")
        body = environ["wsgi.input"].read(length) if length else b""
        status, document = route(environ["REQUEST_METHOD"], environ["PATH_INFO"], body, environ)
    except BadRequest as exc:
        status, document = 400, {"error": str(exc)}
    except (pgqueue.PgQueueError, psycopg.Error) as exc:
        print(f"shop: {type(exc).__name__}: {exc}", file=sys.stderr)
        status, document = 503, {"error": "the database is unavailable; try again"}
    reasons = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}
    payload = json.dumps(document).encode()
    start_response(
        f"{status} {reasons.get(status, 'Service Unavailable')}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
    )
    return [payload]


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shop", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="create the shop's tables (pgqueue migrate does pgqueue's)")
    serve = commands.add_parser("serve", help="run the web app")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.command == "migrate":
        with psycopg.connect(dsn()) as conn:
            conn.execute(SCHEMA_SQL)
        print("shop: tables ready")
        return
    server = make_server(
        args.host, args.port, wsgi, server_class=ThreadingServer, handler_class=QuietHandler
    )
    print(f"shop: listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
