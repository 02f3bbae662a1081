"""The outbox relay: claim committed messages, deliver them through sinks, settle in batches."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pgqueue.app import App, Route
from pgqueue.breaker import CircuitBreaker
from pgqueue.config import resolve_schema
from pgqueue.errors import ConfigurationError, DatabaseError, SchemaNotReady
from pgqueue.heartbeat import HeartbeatThread, rescue_in_batches
from pgqueue.lanes import Lanes
from pgqueue.lifecycle import (
    ClaimingProcess,
    check_event_loop,
    freeze_startup_heap,
    run_event_loop,
    thaw_heap,
    wind_down,
)
from pgqueue.listener import Listener
from pgqueue.metrics import Metrics
from pgqueue.outbox import outbox_channel
from pgqueue.outcome import RELEASE, Outcome, format_error
from pgqueue.payload import Undecodable
from pgqueue.sinks import DeliveryError, Message, Sink
from pgqueue.store import MaintenanceSession, MessageStore, Settlement, SettleQueue
from pgqueue.timeouts import DeadlineWatch, watch_resolution

log = logging.getLogger("pgqueue.relay")


@dataclass
class RelaySettings:
    """Tuning knobs; durations in seconds."""

    concurrency: int = 256  # messages in flight in this process, across all sinks
    lease_seconds: float = 30.0
    poll_seconds: float = 1.0
    shutdown_grace_seconds: float = 15.0
    listen: bool = True
    batch_size: int = 500
    retention_seconds: float = 86_400.0  # delivered history kept; 0 keeps none
    breaker_failures: int = 5
    breaker_cooldown_seconds: float = 2.0
    metrics_port: int | None = None
    freeze_heap: bool = True  # gc.freeze() once started: see lifecycle.freeze_startup_heap
    # "auto" (uvloop when installed), "asyncio" or "uvloop": see lifecycle.run_event_loop.
    event_loop: str = "auto"

    def __post_init__(self) -> None:
        check_event_loop(self.event_loop)
        if self.concurrency < 1 or self.batch_size < 1:
            raise ValueError("concurrency and batch_size must be >= 1")
        if not self.lease_seconds > 0 or not self.poll_seconds > 0:
            raise ValueError("lease_seconds and poll_seconds must be > 0")
        if self.retention_seconds < 0:
            raise ValueError("retention_seconds must be >= 0")


@dataclass
class RelayStats:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    lost: int = 0


@dataclass
class _InFlight:
    message: Message
    token: uuid.UUID
    route: Route | None
    task: asyncio.Task[None] | None = None


class Relay(ClaimingProcess[MessageStore]):
    """Delivers the outbox of ``dsn`` through the routes of ``app``.

    >>> pgqueue.Relay(app, dsn).run()
    """

    def __init__(
        self,
        app: App,
        dsn: str,
        *,
        schema: str | None = None,
        settings: RelaySettings | None = None,
    ) -> None:
        if not app.routes:
            raise ConfigurationError(
                "the app has no outbox routes: "
                "add app.route('topic.*', sink) before running a relay"
            )
        self.app = app
        self.dsn = dsn
        self.schema = resolve_schema(schema or app.schema)
        self.settings = settings or RelaySettings()
        self.id = uuid.uuid4()
        self.stats = RelayStats()
        self.exit_code = 0
        self.store = MessageStore(
            dsn, self.schema, keep_history=self.settings.retention_seconds > 0
        )
        self.leases: dict[int, uuid.UUID] = {}
        self.lost: set[int] = set()
        self.breakers = {
            sink.name: CircuitBreaker(
                failure_threshold=self.settings.breaker_failures,
                cooldown_seconds=self.settings.breaker_cooldown_seconds,
            )
            for sink in app.sinks()
        }
        self.metrics = Metrics() if self.settings.metrics_port is not None else None
        self._in_flight: dict[int, _InFlight] = {}
        self._lanes: Lanes[_InFlight] = Lanes(
            self._run_on_lane, self.settings.concurrency, fan_out="all", name="delivery lane"
        )
        # Route timeouts: one scan for all deliveries rather than a timer each.
        self._deadlines = DeadlineWatch(
            watch_resolution(min(route.timeout_seconds for route in app.routes))
        )
        self._sink_slots: dict[str, asyncio.Semaphore] = {}
        self._settle = SettleQueue(
            self.store, self._count, what="delivery", on_schema_error=self._schema_error
        )
        self._init_lifecycle()

    # ------------------------------------------------------------ heartbeat hooks

    @property
    def lease_seconds(self) -> float:
        return self.settings.lease_seconds

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    @property
    def process(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "relay",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": [sink.name for sink in self.app.sinks()],
            "concurrency": self.settings.concurrency,
        }

    def _rescue(self, session: MaintenanceSession) -> int:
        rescued = rescue_in_batches(session, "rescue_expired_messages", {})
        if self.metrics is not None:
            rows = session.run("outbox_status", {})
            self.metrics.outbox_lag.set(max((r["oldest_pending_seconds"] for r in rows), default=0))
        return rescued

    def _prune(self, session: MaintenanceSession) -> None:
        session.run("prune_processes", {"stale_seconds": max(60.0, self.lease_seconds * 4)})
        session.run("prune_outbox_throughput", {})
        if self.settings.retention_seconds > 0:
            # Small batches: a long DELETE would hold locks and bloat in one go.
            session.run(
                "prune_delivered",
                {"retention_seconds": self.settings.retention_seconds, "limit": 5000},
            )

    def on_lease_lost(self, ids: set[int]) -> None:
        for message_id in ids:
            # Delivered and waiting for its write: that write says whether the lease held
            # (a renewal that ran just after the write deleted the row lands here too).
            if message_id not in self._in_flight:
                continue
            if message_id not in self.lost:
                self.lost.add(message_id)
                log.warning(
                    "message %d: lease lost; its delivery result will be discarded", message_id
                )

    # ------------------------------------------------------------ lifecycle

    def run(self, *, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT (first: graceful; second: immediate exit)."""
        return run_event_loop(
            self.run_async(install_signals=install_signals), self.settings.event_loop
        )

    def _on_signal(self, signum: int) -> None:
        if self._stopping:
            os._exit(130 if signum == signal.SIGINT else 143)
        log.info("%s: stopping claims, finishing deliveries", signal.Signals(signum).name)
        assert self._stop_event is not None
        self._stop_event.set()

    async def _check_routes(self) -> None:
        rows = await self.store.execute("pending_topics", {})
        unrouted = sorted(row["topic"] for row in rows if self.app.route_for(row["topic"]) is None)
        if unrouted:
            raise ConfigurationError(
                f"pending outbox messages have topics no route matches: {', '.join(unrouted)}; "
                "add app.route(...) for them (or a '*' default route) and restart the relay"
            )

    async def run_async(self, *, install_signals: bool = False) -> int:
        self._start_lifecycle(install_signals)
        assert self._wake is not None
        heartbeat = HeartbeatThread(
            self,
            renew_query="heartbeat_messages",
            rescue=self._rescue,
            prune=self._prune,
            interval=self.lease_seconds / 3,
            rescue_interval=self.lease_seconds / 2,
        )
        background: list[asyncio.Task[Any]] = []
        started: list[Sink] = []
        frozen = False
        try:
            if self.metrics is not None and self.settings.metrics_port is not None:
                self.metrics.serve(self.settings.metrics_port)
            await self._check_routes()
            for sink in self.app.sinks():
                await sink.start()
                started.append(sink)
                self._sink_slots[sink.name] = asyncio.Semaphore(max(1, sink.max_in_flight))
            frozen = self.settings.freeze_heap and freeze_startup_heap()
            heartbeat.start()
            # Settling a key's message leases its next one to this relay (no claim between).
            self.store.handoff = (self.id, self.lease_seconds)
            background.append(asyncio.create_task(self._settle.run(), name="settle"))
            background.append(asyncio.create_task(self._deadlines.run(), name="deadlines"))
            if self.settings.listen:
                listener = Listener(
                    self.dsn, [outbox_channel(self.schema)], self._wake.set, role="relay-listen"
                )
                background.append(asyncio.create_task(listener.run(), name="listen"))
            log.info("relay %s started: sinks=%s", self.id, ",".join(s.name for s in started))
            await self._claim_until_stopped(self._fetch_loop(), self._drain)
        except (SchemaNotReady, ConfigurationError) as exc:
            log.error("%s", exc)
            self.exit_code = 3 if isinstance(exc, SchemaNotReady) else 1
        finally:
            self._stopping = True
            self._lanes.close()
            await wind_down([*background, *self._lanes.tasks], heartbeat, self.store, self.id)
            for sink in started:
                try:
                    await sink.close()
                except Exception as exc:
                    log.warning("closing sink %s failed: %s", sink.name, exc)
            await self.store.close()
            thaw_heap(frozen)
            log.info("relay %s stopped: %s", self.id, self.stats)
        return self.exit_code

    async def _drain(self) -> None:
        # Claimed but not started (waiting for a lane): back at once, never attempted.
        for waiting in self._lanes.take_waiting():
            self._in_flight.pop(waiting.message.sequence, None)
            self._record(waiting, RELEASE)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        while self._in_flight and time.monotonic() < deadline:
            assert self._capacity is not None
            self._capacity.clear()
            try:
                await asyncio.wait_for(self._capacity.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        for flight in list(self._in_flight.values()):
            self._record(flight, RELEASE)
            if flight.task is not None:
                flight.task.cancel()
        self._in_flight.clear()
        await self._settle.flush(final=True)

    # ------------------------------------------------------------ claiming and delivering

    async def _fetch_loop(self) -> None:
        assert self._wake is not None and self._capacity is not None
        failures = 0
        while not self._stopping:
            free = self.settings.concurrency - len(self._in_flight)
            if free <= 0:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            self._wake.clear()
            limit = min(free, self.settings.batch_size)
            try:
                rows = await self.store.claim_messages(
                    limit, relay_id=self.id, lease_seconds=self.lease_seconds
                )
                failures = 0
            except SchemaNotReady:
                raise
            except DatabaseError as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("claim failed (%s); retrying with backoff", exc)
                await asyncio.sleep(min(10.0, 0.1 * 2 ** min(failures, 7)))
                continue
            for row in rows:
                self._start(row)
            if len(rows) == limit:
                await asyncio.sleep(0)
                continue
            await self._wait_after_claim(
                bool(rows), listens=self.settings.listen, poll_seconds=self.settings.poll_seconds
            )

    def _start(self, row: dict[str, Any]) -> None:
        created: datetime = row["created_at"]
        message = Message(
            id=row["message_id"],
            sequence=row["id"],
            topic=row["topic"],
            key=row["key"],
            headers=row["headers"] or {},
            attempt=row["attempts"],
            created_at=created,
            payload_json=row["payload"],
        )
        self.stats.claimed += 1
        # A lease lost by an earlier claim of this row does not concern this one.
        self.lost.discard(message.sequence)
        flight = _InFlight(message, row["lease_token"], self.app.route_for(message.topic))
        self.leases[message.sequence] = flight.token
        if self._stopping:
            # Claimed, or handed over, by a write that began before the shutdown: give it
            # back at once, unattempted.
            self._record(flight, RELEASE)
            return
        self._in_flight[message.sequence] = flight
        self._lanes.push(flight)

    async def _run_on_lane(self, flight: _InFlight, lane: asyncio.Task[None]) -> None:
        flight.task = lane
        await self._deliver(flight)
        flight.task = None

    async def _deliver(self, flight: _InFlight) -> None:
        message = flight.message
        try:
            outcome = await self._attempt(flight)
        except asyncio.CancelledError:
            if self._stopping:
                return
            raise
        self._in_flight.pop(message.sequence, None)
        assert self._capacity is not None
        self._capacity.set()
        self._record(flight, outcome)

    async def _attempt(self, flight: _InFlight) -> Outcome:
        message, route = flight.message, flight.route
        if route is None:
            log.error("message %s: no route matches topic %r", message.id, message.topic)
            return Outcome(
                "fail",
                reason="no_route",
                error=f"no route matches topic {message.topic!r}: add app.route(...) and "
                "requeue with `pgqueue outbox requeue`",
                blocks_key=True,
            )
        # A sink that forwards the stored JSON text never decodes it: only the others need
        # a payload Python's decoder can read (Undecodable: nested past its limit).
        if not getattr(route.sink, "forwards_payload_json", False) and isinstance(
            message.payload, Undecodable
        ):
            return Outcome(
                "fail",
                reason="undecodable",
                error=f"the stored payload cannot be decoded: {message.payload.error}",
                blocks_key=route.dead_blocks_key,
            )
        if message.attempt > route.max_attempts:
            return Outcome(
                "fail",
                reason="max_attempts",
                error=f"lease expired during the last of {route.max_attempts} attempts",
                blocks_key=route.dead_blocks_key,
            )
        name = route.sink.name
        breaker = self.breakers[name]
        # Wait for one of the sink's slots before the deadline starts: a slow but healthy
        # destination must not see queueing time counted as its own timeouts.
        async with self._sink_slots[name]:
            allowed, wait, is_probe = breaker.allow()
            if not allowed:
                # The destination is failing: hold the message back without using an attempt.
                return Outcome("snooze", delay_seconds=wait, error=f"circuit open for sink {name}")
            timeout = route.timeout_seconds
            try:
                async with self._deadlines.limit(
                    timeout,
                    f"sink {name!r} did not answer within its route's timeout of {timeout:g}s",
                ):
                    await route.sink.deliver(message)
            except Exception as exc:
                return self._failed(message, route, breaker, exc, is_probe)
        if breaker.record_success(is_probe=is_probe):
            log.info("sink %s answers again: circuit closed", name)
        if self.metrics is not None:
            self.metrics.delivered.labels(name).inc()
        return Outcome("complete")

    def _failed(
        self,
        message: Message,
        route: Route,
        breaker: CircuitBreaker,
        exc: BaseException,
        is_probe: bool,
    ) -> Outcome:
        if self.metrics is not None:
            self.metrics.delivery_failed.labels(route.sink.name).inc()
        if isinstance(exc, DeliveryError) and exc.is_permanent:
            breaker.record_success(is_probe=is_probe)  # the destination answered; it is up
        elif breaker.record_failure(is_probe=is_probe):
            log.warning(
                "sink %s keeps failing (%s): circuit open for %.1fs, its messages wait",
                route.sink.name,
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                breaker.current_cooldown,
            )
        if isinstance(exc, DeliveryError):
            if exc.is_permanent:
                return Outcome(
                    "fail",
                    reason="rejected",
                    error=format_error(exc, with_traceback=False),
                    blocks_key=route.dead_blocks_key,
                )
            return self._retry(message, route, exc, exc.retry_after_seconds)
        # Any other failure (timeout, connection, a bug in a sink) is transient.
        return self._retry(message, route, exc, None)

    @staticmethod
    def _retry(message: Message, route: Route, exc: BaseException, after: float | None) -> Outcome:
        error = format_error(exc, with_traceback=not isinstance(exc, DeliveryError))
        if message.attempt >= route.max_attempts:
            return Outcome(
                "fail", reason="max_attempts", error=error, blocks_key=route.dead_blocks_key
            )
        delay = route.retry.delay_seconds(message.attempt)
        if after is not None:
            delay = max(delay, after)
        return Outcome("retry", delay_seconds=delay, error=error)

    # ------------------------------------------------------------ settling

    def _record(self, flight: _InFlight, outcome: Outcome) -> None:
        message = flight.message
        if message.sequence in self.lost:
            self.leases.pop(message.sequence, None)
            return
        self._settle.pending.add(message.sequence, flight.token, outcome)
        if outcome.kind == "complete" and flight.route is not None:
            self._settle.pending.sinks[message.sequence] = flight.route.sink.name
        if outcome.kind == "fail":
            log.warning(
                "message %s (%s) dead-lettered after attempt %d (%s): %s",
                message.id,
                message.topic,
                message.attempt,
                outcome.reason,
                (outcome.error or "").splitlines()[0] if outcome.error else "",
            )
        self._settle.notify()

    def _count(self, batch: Settlement, written: set[int]) -> None:
        kinds = (
            [(i, token, "complete") for i, token in batch.complete]
            + [(i, token, "retry") for i, token, _ in batch.retry]
            + [(i, token, "fail") for i, token, _ in batch.fail]
            + [(i, token, "release") for i, token in batch.release]
        )
        for sequence, token, kind in kinds:
            # Only this lease: a retried message may already be claimed again.
            if self.leases.get(sequence) == token:
                del self.leases[sequence]
            if sequence not in written:
                self.stats.lost += 1
                log.warning(
                    "message row %d: outcome %r not written, the lease was lost", sequence, kind
                )
            elif kind == "complete":
                self.stats.delivered += 1
            elif kind == "retry":
                self.stats.retried += 1
            elif kind == "fail":
                self.stats.failed += 1
        for row in self.store.take_handed_over():
            self._start(row)
