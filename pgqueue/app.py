"""The App: a registry of task handlers by name, with per-task defaults and typed enqueue."""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from pgqueue.cron import CronSchedule
from pgqueue.enqueue import DEFAULT_QUEUE, enqueue, enqueue_async
from pgqueue.job import Job
from pgqueue.names import queue_name, task_name
from pgqueue.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from pgqueue.sinks import Sink

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class EnqueueOptions:
    """Per-call options for :meth:`Task.enqueue`, set through :meth:`Task.options`."""

    queue: str | None = None
    priority: int | None = None
    run_at: datetime | None = None
    delay: float | timedelta | None = None
    max_attempts: int | None = None
    timeout: float | timedelta | None = None
    headers: Mapping[str, str] | None = None
    ordering_key: str | None = None
    unique_key: str | None = None
    on_duplicate: str | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Task(Generic[P, R]):
    """A registered handler and its defaults; call ``.enqueue(conn, **kwargs)`` to queue it.

    The handler takes the :class:`Job` first, then the job's arguments as keyword
    arguments; it may be ``def`` or ``async def``.
    """

    name: str
    handler: Callable[Concatenate[Job, P], R]
    queue: str = DEFAULT_QUEUE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout_seconds: float | None = None
    retry: RetryPolicy = DEFAULT_RETRY_POLICY
    non_retryable: tuple[type[BaseException], ...] = ()
    dead_blocks_key: bool = True
    batch_size: int | None = None
    schema: str | None = None
    call_options: EnqueueOptions = field(default_factory=EnqueueOptions)

    @cached_property
    def is_async(self) -> bool:
        # Cached: asked once per job, and inspect's answer costs more than a no-op handler.
        return inspect.iscoroutinefunction(self.handler)

    def options(self, **options: Any) -> Task[P, R]:
        """A copy whose next ``enqueue`` uses these options (queue, delay, priority, ...)."""
        merged = {**self.call_options.as_kwargs(), **options}
        return replace(self, call_options=EnqueueOptions(**merged))

    def _arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self.batch_size is not None:
            # A batch handler takes a list of jobs; each job's arguments are free keywords.
            if args:
                raise TypeError(f"batch task {self.name!r} takes keyword arguments only")
            return dict(kwargs)
        signature = inspect.signature(self.handler)
        try:
            bound = signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"arguments for task {self.name!r} do not fit its handler: {exc}"
            ) from None
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
            elif parameter.kind is inspect.Parameter.VAR_POSITIONAL and name in arguments:
                raise TypeError(
                    f"task {self.name!r}: *args handlers cannot be enqueued by position"
                )
        return arguments

    def _enqueue_kwargs(self) -> dict[str, Any]:
        options = {"queue": self.queue, "max_attempts": self.max_attempts}
        if self.timeout_seconds is not None:
            options["timeout"] = self.timeout_seconds
        options.update(self.call_options.as_kwargs())
        if self.schema is not None:
            options["schema"] = self.schema
        return options

    def enqueue(self, conn: Any, *args: P.args, **kwargs: P.kwargs) -> int:
        """Enqueue this task in the caller's transaction with the task's defaults."""
        return enqueue(conn, self.name, self._arguments(args, kwargs), **self._enqueue_kwargs())

    async def enqueue_async(self, conn: Any, *args: P.args, **kwargs: P.kwargs) -> int:
        """The async twin of :meth:`enqueue`."""
        return await enqueue_async(
            conn, self.name, self._arguments(args, kwargs), **self._enqueue_kwargs()
        )


@dataclass(frozen=True)
class Periodic:
    """A cron schedule that enqueues ``task`` with ``args`` at every tick."""

    name: str
    schedule: CronSchedule
    task: str
    args: Mapping[str, Any]
    backfill: bool = False
    misfire_grace_seconds: float = 60.0


OUTBOX_RETRY_POLICY = RetryPolicy(base_seconds=1.0, max_seconds=300.0)
_PATTERN = re.compile(r"[A-Za-z0-9_.\-*?]{1,48}")


@dataclass(frozen=True)
class Route:
    """Outbox messages whose topic matches ``pattern`` (a glob: ``order.*``) go to ``sink``.

    Failed deliveries retry with ``retry`` backoff up to ``max_attempts``, then go to the
    outbox dead letters. ``dead_blocks_key``: a dead message holds back the later messages
    of its key until an operator requeues or discards it (True), or lets them go on.
    """

    pattern: str
    sink: Sink
    max_attempts: int = 25
    retry: RetryPolicy = OUTBOX_RETRY_POLICY
    dead_blocks_key: bool = True
    timeout_seconds: float = 60.0

    def matches(self, topic: str) -> bool:
        return fnmatch.fnmatchcase(topic, self.pattern)


class App:
    """Holds the tasks a worker can run. Handlers are looked up by name only.

    >>> app = pgqueue.App()
    >>> @app.task(queue="email", max_attempts=10, timeout=30)
    ... def send_receipt(job, order_id: int): ...
    """

    def __init__(self, *, schema: str | None = None) -> None:
        self.schema = schema
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.periodic_jobs: dict[str, Periodic] = {}
        self.routes: list[Route] = []

    @overload
    def task(self, function: Callable[Concatenate[Job, P], R]) -> Task[P, R]: ...

    @overload
    def task(
        self,
        function: None = None,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | timedelta | None = None,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        non_retryable: Iterable[type[BaseException]] = (),
        dead_blocks_key: bool = True,
        batch_size: int | None = None,
    ) -> Callable[[Callable[Concatenate[Job, P], R]], Task[P, R]]: ...

    def task(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | timedelta | None = None,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        non_retryable: Iterable[type[BaseException]] = (),
        dead_blocks_key: bool = True,
        batch_size: int | None = None,
    ) -> Any:
        """Register a handler. The task name defaults to the function's ``__name__``.

        ``timeout`` (seconds or timedelta) is the hard limit of one attempt; ``retry`` the
        backoff policy; ``non_retryable`` exception types skip retries and dead-letter.
        ``dead_blocks_key``: when a job with an ordering key is dead-lettered, the later jobs
        of its key wait until an operator requeues or discards it (True, the default), or go
        on without it (False). ``batch_size``: the handler takes a list of up to that many
        jobs (``def handler(jobs: list[Job])``) and may return ``{job.id: exception}`` for
        the items that failed; each job is still acked, retried or dead-lettered on its own.
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError("max_attempts must be an int >= 1")
        timeout_seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        if timeout_seconds is not None and not timeout_seconds > 0:
            raise ValueError("timeout must be a positive number of seconds or a timedelta")
        errors = tuple(non_retryable)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError("batch_size must be an int >= 1, or None for one job per call")

        def register(handler: Callable[..., Any]) -> Task[Any, Any]:
            task = Task(
                name=task_name(name or handler.__name__),
                handler=handler,
                queue=queue_name(queue),
                max_attempts=max_attempts,
                timeout_seconds=None if timeout_seconds is None else float(timeout_seconds),
                retry=retry,
                non_retryable=errors,
                dead_blocks_key=dead_blocks_key,
                batch_size=batch_size,
                schema=self.schema,
            )
            if task.name in self.tasks:
                raise ValueError(f"task {task.name!r} is registered twice; pass name=... to one")
            self.tasks[task.name] = task
            return task

        return register(function) if function is not None else register

    def periodic(
        self,
        cron: str,
        *,
        name: str | None = None,
        args: Mapping[str, Any] | None = None,
        backfill: bool = False,
        misfire_grace_seconds: float = 60.0,
        **task_options: Any,
    ) -> Callable[[Callable[..., Any]], Task[Any, Any]]:
        """Register a handler as a task and enqueue it on a cron schedule.

        ``cron`` has 5 fields (minute precision) or 6 (a leading seconds field), or a
        macro such as ``@hourly``; ticks follow the database clock in UTC. Each tick is
        enqueued exactly once however many workers run. After downtime only ticks younger
        than ``misfire_grace_seconds`` are enqueued, unless ``backfill=True`` (then every
        missed tick since the last one recorded, at most 1,000).

        >>> @app.periodic("*/5 * * * *", queue="maintenance")
        ... def purge_sessions(job): ...
        """
        schedule = CronSchedule.parse(cron)

        def register(handler: Callable[..., Any]) -> Task[Any, Any]:
            task = (
                self.task(handler, **task_options)
                if not task_options
                else self.task(**task_options)(handler)
            )
            entry = Periodic(
                name=task_name(name or task.name),
                schedule=schedule,
                task=task.name,
                args=dict(args or {}),
                backfill=backfill,
                misfire_grace_seconds=float(misfire_grace_seconds),
            )
            if entry.name in self.periodic_jobs:
                raise ValueError(f"periodic job {entry.name!r} is registered twice")
            self.periodic_jobs[entry.name] = entry
            return task

        return register

    def route(
        self,
        pattern: str,
        sink: Sink,
        *,
        max_attempts: int = 25,
        retry: RetryPolicy = OUTBOX_RETRY_POLICY,
        dead_blocks_key: bool = True,
        timeout: float | timedelta = 60.0,
    ) -> Route:
        """Send outbox messages whose topic matches ``pattern`` to ``sink``.

        Routes are tried in the order they were added; the first match wins. Use ``"*"``
        last as a default route. A topic no route matches is dead-lettered with reason
        ``no_route`` (never dropped), and reported when the relay starts.

        >>> app.route("order.*", WebhookSink("billing", "https://billing.internal/hooks"))
        """
        if not isinstance(pattern, str) or _PATTERN.fullmatch(pattern) is None:
            raise ValueError(
                f"invalid route pattern {pattern!r}: use a topic name, optionally with "
                "'*' and '?' wildcards, at most 48 bytes"
            )
        if not isinstance(sink, Sink):
            raise TypeError(
                f"{type(sink).__name__} is not a Sink: it needs name, max_in_flight, "
                "start(), deliver(message) and close()"
            )
        queue_name(sink.name)
        others = {r.sink.name: r.sink for r in self.routes}
        if sink.name in others and others[sink.name] is not sink:
            raise ValueError(f"two different sinks are named {sink.name!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError("max_attempts must be an int >= 1")
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        if not seconds > 0:
            raise ValueError("timeout must be a positive number of seconds")
        route = Route(pattern, sink, max_attempts, retry, dead_blocks_key, seconds)
        self.routes.append(route)
        return route

    def route_for(self, topic: str) -> Route | None:
        """The first route whose pattern matches ``topic``."""
        for route in self.routes:
            if route.matches(topic):
                return route
        return None

    def sinks(self) -> list[Sink]:
        """Each distinct sink of the routes, once."""
        seen: dict[str, Sink] = {}
        for route in self.routes:
            seen.setdefault(route.sink.name, route.sink)
        return list(seen.values())

    def queues(self) -> list[str]:
        """The queues named by the registered tasks, sorted."""
        return sorted({task.queue for task in self.tasks.values()})


class HandlerParameters:
    """Which keyword arguments a handler accepts: checked per job without inspect.bind."""

    def __init__(self, handler: Any) -> None:
        parameters = list(inspect.signature(handler).parameters.values())[1:]
        kinds = inspect.Parameter
        self.accepts_any = any(p.kind is kinds.VAR_KEYWORD for p in parameters)
        named = [
            p for p in parameters if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
        ]
        self.names = frozenset(p.name for p in named)
        self.required = frozenset(p.name for p in named if p.default is kinds.empty)
        self.accepts_all = self.accepts_any and not self.required

    def mismatch(self, args: Any) -> str | None:
        if self.accepts_all:
            return None
        keys = args.keys()
        missing = self.required - keys
        if missing:
            return f"missing argument(s) {sorted(missing)}"
        if not self.accepts_any:
            unexpected = keys - self.names
            if unexpected:
                return f"unexpected argument(s) {sorted(unexpected)}"
        return None
