"""The worker: claim in batches, run handlers, settle outcomes in batches, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from pgqueue import db
from pgqueue.app import DEFAULT_MAX_ATTEMPTS, App, HandlerParameters, Task
from pgqueue.busy import BusyMark
from pgqueue.claims import ClaimHints
from pgqueue.config import resolve_schema
from pgqueue.errors import DatabaseError, SchemaNotReady
from pgqueue.heartbeat import HeartbeatThread, rescue_in_batches
from pgqueue.job import Job
from pgqueue.job_transaction import JobTransaction, TransactionSessions
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
from pgqueue.names import queue_name
from pgqueue.outcome import COMPLETE, RELEASE, Outcome, decide, format_error
from pgqueue.payload import Undecodable, loads_many
from pgqueue.scheduler import Scheduler
from pgqueue.store import JobStore, MaintenanceSession, Settlement, SettleQueue
from pgqueue.threads import HandlerThreads, JobTimeout
from pgqueue.timeouts import within

log = logging.getLogger("pgqueue.worker")


@dataclass
class WorkerSettings:
    """Tuning knobs; durations in seconds. The defaults suit most deployments."""

    concurrency: int = 10
    lease_seconds: float = 30.0
    heartbeat_seconds: float | None = None  # default: a third of the lease
    rescue_seconds: float | None = None  # default: half the lease
    poll_seconds: float = 1.0
    shutdown_grace_seconds: float = 30.0
    listen: bool = True
    batch_size: int | None = None  # default: concurrency
    run_periodic: bool = True  # enqueue the app's cron ticks (once per tick across workers)
    metrics_port: int | None = None  # serve Prometheus metrics on this port
    freeze_heap: bool = True  # gc.freeze() once started: see lifecycle.freeze_startup_heap
    # Every claim waits for its commit to reach disk (by default a claim of plain jobs in a
    # queue without limits does not: README, "The contract").
    durable_claims: bool = False
    # "auto" (uvloop when installed), "asyncio" or "uvloop": see lifecycle.run_event_loop.
    event_loop: str = "auto"

    def __post_init__(self) -> None:
        check_event_loop(self.event_loop)
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not self.lease_seconds > 0:
            raise ValueError("lease_seconds must be > 0")
        if not self.poll_seconds > 0:
            raise ValueError("poll_seconds must be > 0")


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[None] | None = None


@dataclass
class WorkerStats:
    """Counters since start, for the CLI, the demo and tests."""

    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0


class Worker(ClaimingProcess[JobStore]):
    """Runs the tasks of ``app`` from ``queues`` (default: every queue the app names).

    >>> pgqueue.Worker(app, dsn, queues=["email"], settings=WorkerSettings(concurrency=16)).run()
    """

    def __init__(
        self,
        app: App,
        dsn: str,
        *,
        queues: list[str] | None = None,
        schema: str | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        self.app = app
        self.dsn = dsn
        self.schema = resolve_schema(schema or app.schema)
        self.queues = [queue_name(q) for q in (queues or app.queues() or ["default"])]
        self.settings = settings or WorkerSettings()
        self.id = uuid.uuid4()
        self.stats = WorkerStats()
        self.exit_code = 0
        self.store = JobStore(dsn, self.schema, durable_claims=self.settings.durable_claims)
        self._running: dict[int, _Running] = {}
        # id -> lease token of every job whose outcome is not yet written: the heartbeat
        # thread keeps these leases alive, so a slow settle never loses a finished job.
        self.leases: dict[int, uuid.UUID] = {}
        self.lost: set[int] = set()
        self._labels: dict[int, tuple[str, str]] = {}
        self._settle = SettleQueue(
            self.store, self._count, what="job", on_schema_error=self._schema_error
        )
        self._lanes: Lanes[_Running] = Lanes(
            self._run_on_lane, self.settings.concurrency, fan_out="on_wait", name="lane"
        )
        batch = self.settings.batch_size or self.settings.concurrency
        self._least = max(1, min(batch, self.settings.concurrency) // 4)
        # A job that becomes ready behind a hint waits no longer than the poll would, and
        # never more than a second: a long poll is for when LISTEN carries the wake-ups.
        self._claim_hints = ClaimHints(min(self.settings.poll_seconds, 1.0))
        self._busy = BusyMark(self.store, lambda: self.process, listens=self.settings.listen)
        # Settling a keyed job promotes the next job of its key, which keeps its place in
        # the claim order (behind any hint): the queue's next claim must scan from the start.
        self._keyed_settling: dict[int, str] = {}
        self._init_lifecycle()
        self._threads = HandlerThreads(self.settings.concurrency * 2)
        self.scheduler: Scheduler | None = None
        self.metrics: Metrics | None = None
        if self.settings.metrics_port is not None:
            self.metrics = Metrics()
        self._transactions = TransactionSessions(dsn, self.schema)
        self._task_max_attempts = {name: t.max_attempts for name, t in app.tasks.items()}
        self._signatures = {name: HandlerParameters(t.handler) for name, t in app.tasks.items()}

    # ------------------------------------------------------------ lifecycle

    def run(self, *, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT (first: graceful; second: immediate exit)."""
        return run_event_loop(
            self.run_async(install_signals=install_signals), self.settings.event_loop
        )

    def _on_signal(self, signum: int) -> None:
        if self._stopping:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130 if signum == signal.SIGINT else 143)
        log.info(
            "%s: stopping claims, finishing in-flight jobs (grace %.0fs)",
            signal.Signals(signum).name,
            self.settings.shutdown_grace_seconds,
        )
        assert self._stop_event is not None
        self._stop_event.set()

    async def run_async(self, *, install_signals: bool = False) -> int:
        self._start_lifecycle(install_signals)
        assert self._wake is not None
        heartbeat = HeartbeatThread(
            self,
            renew_query="heartbeat_jobs",
            rescue=self._rescue,
            prune=self._prune,
            interval=self.settings.heartbeat_seconds or self.lease_seconds / 3,
            rescue_interval=self.settings.rescue_seconds or self.lease_seconds / 2,
        )
        background: list[asyncio.Task[Any]] = []
        frozen = False
        try:
            if self.metrics is not None and self.settings.metrics_port is not None:
                self.metrics.serve(self.settings.metrics_port)
            await self.store.execute("register_queues", {"queues": self.queues})
            try:
                await self._busy.start(self.settings.poll_seconds)
            except SchemaNotReady:
                raise
            except DatabaseError as exc:
                # Unknown then, and written at the first wait instead.
                log.warning("could not write this worker's busy mark (%s)", exc)
            frozen = self.settings.freeze_heap and freeze_startup_heap()
            heartbeat.start()
            background.append(asyncio.create_task(self._settle.run(), name="settle"))
            if self.settings.run_periodic and self.app.periodic_jobs:
                self.scheduler = Scheduler(self)
                background.append(asyncio.create_task(self.scheduler.run(), name="cron"))
            if self.settings.listen:
                channels = [db.channel(self.schema, q) for q in self.queues]
                listener = Listener(self.dsn, channels, self._wake.set, role="worker-listen")
                background.append(asyncio.create_task(listener.run(), name="listen"))
            log.info(
                "worker %s started: queues=%s concurrency=%d",
                self.id,
                ",".join(self.queues),
                self.settings.concurrency,
            )
            await self._claim_until_stopped(self._fetch_loop(), self._drain)
        except SchemaNotReady as exc:
            log.error("%s", exc)
            self.exit_code = 3
        finally:
            self._stopping = True
            self._lanes.close()
            await wind_down([*background, *self._lanes.tasks], heartbeat, self.store, self.id)
            await self.store.close()
            await self._transactions.close()
            self._threads.shutdown()
            thaw_heap(frozen)
            log.info("worker %s stopped: %s", self.id, self.stats)
        return self.exit_code

    async def _drain(self) -> None:
        """Let in-flight jobs finish within the grace period, then release the rest."""
        # Claimed but not started: give them back at once, they never began.
        for waiting in self._lanes.take_waiting():
            self._running.pop(waiting.job.id, None)
            self._record(waiting.job, RELEASE)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        while self._running and time.monotonic() < deadline:
            assert self._capacity is not None
            self._capacity.clear()
            try:
                await asyncio.wait_for(self._capacity.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        for running in list(self._running.values()):
            job = running.job
            log.warning("releasing job %d (%s): shutdown grace period over", job.id, job.task)
            self._record(job, RELEASE)
            if running.task is not None:
                running.task.cancel()
            self._running.pop(job.id, None)
        await self._settle.flush(final=True)

    # ------------------------------------------------------------ claiming

    async def _fetch_loop(self) -> None:
        assert self._wake is not None and self._capacity is not None
        batch_size = self.settings.batch_size or self.settings.concurrency
        failures = 0
        rotation = 0
        # While jobs run, wait until a worthwhile share of the slots is free: a claim is a
        # round trip and a commit, and many tiny claims cost more than they bring.
        least = self._least
        while not self._stopping:
            free = self.settings.concurrency - len(self._running)
            if free <= 0 or (free < least and self._running):
                self._capacity.clear()
                await self._capacity.wait()
                continue
            if self._threads.abandoned >= self.settings.concurrency:
                log.error(
                    "%d handler threads are stuck past their timeout: exiting so a "
                    "supervisor restarts this worker",
                    self._threads.abandoned,
                )
                self.exit_code = 4
                return
            self._wake.clear()
            claimed_any = False
            is_full = False
            wait_seconds = 0.0
            try:
                order = self.queues[rotation:] + self.queues[:rotation]
                rotation = (rotation + 1) % len(self.queues)
                for queue in order:
                    limit = min(free, batch_size)
                    hint = self._claim_hints.get(queue)
                    rows = await self.store.claim(
                        queue,
                        limit,
                        worker_id=self.id,
                        lease_seconds=self.settings.lease_seconds,
                        task_max_attempts=self._task_max_attempts,
                        default_max_attempts=DEFAULT_MAX_ATTEMPTS,
                        hint=hint,
                    )
                    self._claim_hints.record(queue, rows, limit, hint)
                    failures = 0
                    self._dispatch(rows)
                    claimed_any = claimed_any or bool(rows)
                    is_full = is_full or len(rows) == limit
                    free -= len(rows)
                    if free <= 0 or self._stopping:
                        break
                if self._stopping:
                    break
                if is_full:
                    await self._busy.claimed_full()
                else:
                    wait_seconds = await self._busy.before_wait(
                        self.settings.poll_seconds, self._wake
                    )
            except SchemaNotReady:
                raise
            except DatabaseError as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("claim failed (%s); retrying with backoff", exc)
                await asyncio.sleep(min(10.0, 0.1 * 2 ** min(failures, 7)))
                continue
            if is_full:
                await asyncio.sleep(0)
                continue
            if wait_seconds > 0:
                await self._wait_after_claim(
                    claimed_any, listens=self.settings.listen, poll_seconds=wait_seconds
                )

    def _dispatch(self, rows: list[tuple[Any, ...]]) -> None:
        """Start claimed jobs: one runner per job, or per batch for batch tasks."""
        batches: dict[str, list[Job]] = {}
        tasks = self.app.tasks
        arguments = loads_many([row[3] for row in rows])
        for row, args in zip(rows, arguments, strict=True):
            # Column order of the claim_jobs query; args (text there) decoded above.
            job = Job(*row, _provider=self)  # type: ignore[misc]
            job.args = args
            if job.headers is None:
                job.headers = {}
            task = tasks.get(job.task)
            if task is not None and task.batch_size is not None:
                batches.setdefault(task.name, []).append(job)
            else:
                self._start(job)
        for name, jobs in batches.items():
            size = self.app.tasks[name].batch_size or 1
            for index in range(0, len(jobs), size):
                self._start_batch(jobs[index : index + size])

    def _start(self, job: Job) -> None:
        self.stats.claimed += 1
        if self.metrics is not None:
            self.metrics.started.labels(job.queue, job.task).inc()
        self.leases[job.id] = job.lease_token
        running = _Running(job)
        self._running[job.id] = running
        self._lanes.push(running)

    def _slot_freed(self) -> None:
        # Wake the claim loop only when a claim is worth it (or for shutdown's drain).
        if not self._running or self.settings.concurrency - len(self._running) >= self._least:
            assert self._capacity is not None
            self._capacity.set()

    async def _run_on_lane(self, running: _Running, lane: asyncio.Task[None]) -> None:
        running.task = lane
        await self._execute(running)
        running.task = None

    def _start_batch(self, jobs: list[Job]) -> None:
        self.stats.claimed += len(jobs)
        for job in jobs:
            self.leases[job.id] = job.lease_token
            self._running[job.id] = _Running(job)
        runner = asyncio.create_task(self._execute_batch(jobs))
        for job in jobs:
            self._running[job.id].task = runner

    # ------------------------------------------------------------ running

    async def _execute_batch(self, jobs: list[Job]) -> None:
        """Run a batch handler; each job then gets its own outcome."""
        task = self.app.tasks[jobs[0].task]
        failures: dict[int, BaseException] = {}
        batch_error: BaseException | None = None
        try:
            bad = [job for job in jobs if not isinstance(job.args, dict)]
            for job in bad:
                failures[job.id] = TypeError(
                    f"args must be a JSON object, found {type(job.args).__name__}"
                )
            runnable = [job for job in jobs if job not in bad]
            if runnable:
                result = await self._invoke(task, (runnable,), {}, jobs[0])
                if isinstance(result, dict):
                    failures.update(result)
        except asyncio.CancelledError:
            if self._stopping or all(job.id in self.lost for job in jobs):
                for job in jobs:
                    self._running.pop(job.id, None)
                    if job.id in self.lost:
                        self.leases.pop(job.id, None)
                self._slot_freed()
                return
            raise
        except BaseException as exc:
            batch_error = exc
        for job in jobs:
            self._running.pop(job.id, None)
            error = batch_error or failures.get(job.id)
            if error is None:
                outcome = decide(
                    None, attempt=job.attempt, max_attempts=job.max_attempts, policy=task.retry
                )
            else:
                outcome = decide(
                    error,
                    attempt=job.attempt,
                    max_attempts=job.max_attempts,
                    policy=task.retry,
                    non_retryable=task.non_retryable,
                )
            self._record(job, outcome)
        self._slot_freed()

    async def _invoke(
        self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any], job: Job
    ) -> Any:
        """Call a handler (sync on a thread, async on the loop) under its hard timeout."""
        timeout = job.timeout_seconds or task.timeout_seconds
        if task.is_async:
            coroutine = task.handler(*args, **kwargs)
            if timeout is None:
                return await coroutine
            try:
                return await within(coroutine, timeout)
            except asyncio.TimeoutError:
                raise JobTimeout(f"handler ran past its timeout of {timeout:g}s") from None
        return await self._threads.call(task.handler, args, kwargs, timeout)

    async def _execute(self, running: _Running) -> None:
        job = running.job
        task = self.app.tasks.get(job.task)
        outcome: Outcome
        try:
            if task is None:
                outcome = Outcome(
                    "fail",
                    reason="unknown_task",
                    error=f"no task named {job.task!r} is registered on this worker's app; "
                    "deploy a worker that has it, then `pgqueue dlq requeue`",
                )
            elif isinstance(job.args, Undecodable):
                outcome = Outcome(
                    "fail",
                    reason="bad_arguments",
                    error=f"args cannot be decoded: {job.args.error}",
                )
            elif not isinstance(job.args, dict):
                outcome = Outcome(
                    "fail",
                    reason="bad_arguments",
                    error=f"args must be a JSON object, found {type(job.args).__name__}",
                )
            else:
                began = time.perf_counter()
                outcome = await self._call(running, task)
                if self.metrics is not None:
                    self.metrics.duration.labels(job.queue, job.task).observe(
                        time.perf_counter() - began
                    )
        except asyncio.CancelledError:
            if self._stopping or job.id in self.lost:
                # Shutdown released it already, or another worker holds it now. The lane
                # lives on: clear its cancellation so later timeouts behave.
                current = asyncio.current_task()
                if current is not None and getattr(current, "cancelling", lambda: 0)():
                    current.uncancel()  # type: ignore[attr-defined,unused-ignore]
                self._running.pop(job.id, None)
                if job.id in self.lost:
                    self.leases.pop(job.id, None)
                self._slot_freed()
                return
            raise
        self._running.pop(job.id, None)
        self._slot_freed()
        if job.is_acknowledged:
            self.leases.pop(job.id, None)
            if job.ordering_key is not None:
                self._claim_hints.forget(job.queue)  # its key moved on in that transaction
            if outcome.kind != "complete":
                log.warning(
                    "job %d (%s) failed after job.transaction() committed; it stays completed",
                    job.id,
                    job.task,
                )
            self.stats.completed += 1
            return
        self._record(job, outcome)

    async def _call(self, running: _Running, task: Task[Any, Any]) -> Outcome:
        job = running.job
        problem = self._signatures[task.name].mismatch(job.args)
        if problem is not None:
            return Outcome(
                "fail",
                reason="bad_arguments",
                error=f"arguments do not fit handler {task.name!r}: {problem}",
            )
        try:
            await self._invoke(task, (job,), dict(job.args), job)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if job.id in self.lost:
                return Outcome("fail", reason="lease_lost", error=format_error(exc))
            return decide(
                exc,
                attempt=job.attempt,
                max_attempts=job.max_attempts,
                policy=task.retry,
                non_retryable=task.non_retryable,
            )
        return decide(None, attempt=job.attempt, max_attempts=job.max_attempts, policy=task.retry)

    # ------------------------------------------------------------ settling

    def _record(self, job: Job, outcome: Outcome) -> None:
        if job.id in self.lost:
            log.warning(
                "job %d (%s) attempt %d: lease lost, result discarded",
                job.id,
                job.task,
                job.attempt,
            )
            self.leases.pop(job.id, None)
            return
        if outcome.kind == "fail":
            task = self.app.tasks.get(job.task)
            outcome = replace(outcome, blocks_key=task.dead_blocks_key if task else True)
        self._settle.pending.add(job.id, job.lease_token, outcome)
        if job.ordering_key is not None:
            self._keyed_settling[job.id] = job.queue
        if self.metrics is not None:
            self._labels[job.id] = (job.queue, job.task)
        if outcome.kind == "fail":
            log.warning(
                "job %d (%s) dead-lettered after attempt %d/%d (%s): %s",
                job.id,
                job.task,
                job.attempt,
                job.max_attempts,
                outcome.reason,
                (outcome.error or "").splitlines()[0] if outcome.error else "",
            )
        elif outcome.kind in ("retry", "snooze"):
            log.info(
                "job %d (%s) attempt %d/%d: %s in %.2fs: %s",
                job.id,
                job.task,
                job.attempt,
                job.max_attempts,
                outcome.kind,
                outcome.delay_seconds,
                (outcome.error or "").splitlines()[0] if outcome.error else "",
            )
        self._settle.notify()

    def _count(self, batch: Settlement, written: set[int]) -> None:
        for job_id, token, outcome in _entries(batch):
            keyed_queue = self._keyed_settling.pop(job_id, None)
            if keyed_queue is not None:
                self._claim_hints.forget(keyed_queue)
            # Only this lease: a retried job may already be claimed again (a new token) by
            # this worker, and that lease must stay under the heartbeat.
            if self.leases.get(job_id) == token:
                del self.leases[job_id]
            labels = self._labels.pop(job_id, None)
            if self.metrics is not None and labels is not None:
                if job_id not in written:
                    self.metrics.lease_lost.inc()
                elif outcome.kind == "complete":
                    self.metrics.succeeded.labels(*labels).inc()
                elif outcome.kind == "retry":
                    self.metrics.retried.labels(*labels).inc()
                elif outcome.kind == "fail":
                    self.metrics.dead.labels(*labels).inc()
            if job_id not in written:
                self.stats.lost += 1
                log.warning(
                    "job %d: outcome %r not written, the lease was lost (another worker "
                    "holds the job or it was rescued)",
                    job_id,
                    outcome.kind,
                )
                continue
            if outcome.kind == "complete":
                self.stats.completed += 1
            elif outcome.kind in ("retry", "snooze"):
                self.stats.retried += 1
            elif outcome.kind == "fail":
                self.stats.failed += 1
            else:
                self.stats.released += 1

    # ------------------------------------------------------------ heartbeat thread hooks

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
            "kind": "worker",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queues,
            "concurrency": self.settings.concurrency,
        }

    def _rescue(self, session: MaintenanceSession) -> int:
        rescued = rescue_in_batches(
            session, "rescue_expired", {"default_max_attempts": DEFAULT_MAX_ATTEMPTS}
        )
        if self.metrics is not None:
            self.metrics.sample_queues(session.run("queue_stats", {}))
        return rescued

    def _prune(self, session: MaintenanceSession) -> None:
        session.run("prune_processes", {"stale_seconds": max(60.0, self.lease_seconds * 4)})
        session.run("prune_throughput", {})
        session.run("advance_stalled_keys", {"limit": 100})
        session.run("prune_cron_ticks", {})

    def on_lease_lost(self, job_ids: set[int]) -> None:
        """Called (thread-safely) when heartbeats find leases taken over."""
        for job_id in job_ids:
            if job_id in self.lost:
                continue
            running = self._running.get(job_id)
            if running is not None and running.job.is_acknowledged:
                continue  # acked by job.transaction() a moment ago: not lost
            self.lost.add(job_id)
            log.warning("job %d: lease lost; its result will be discarded", job_id)
            task = self.app.tasks.get(running.job.task) if running is not None else None
            # A batch keeps running for its other jobs; only this job's result is dropped.
            if (
                running is not None
                and running.task is not None
                and task is not None
                and task.is_async
                and task.batch_size is None
            ):
                running.task.cancel()

    # ------------------------------------------------------------ job.transaction()

    def transaction(self, job: Job) -> JobTransaction:
        return JobTransaction(self._transactions, job, self.leases)


def _entries(batch: Settlement) -> list[tuple[int, uuid.UUID, Outcome]]:
    entries: list[tuple[int, uuid.UUID, Outcome]] = []
    entries.extend((i, t, COMPLETE) for i, t in batch.complete)
    entries.extend(batch.retry)
    entries.extend(batch.fail)
    entries.extend((i, t, RELEASE) for i, t in batch.release)
    return entries
