"""The App: a registry of task handlers by name, with per-task defaults and typed enqueue."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from pgqueue.enqueue import DEFAULT_QUEUE, enqueue, enqueue_async
from pgqueue.job import Job
from pgqueue.names import queue_name, task_name
from pgqueue.retry import DEFAULT_RETRY_POLICY, RetryPolicy

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
    schema: str | None = None
    call_options: EnqueueOptions = field(default_factory=EnqueueOptions)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)

    def options(self, **options: Any) -> Task[P, R]:
        """A copy whose next ``enqueue`` uses these options (queue, delay, priority, ...)."""
        merged = {**self.call_options.as_kwargs(), **options}
        return replace(self, call_options=EnqueueOptions(**merged))

    def _arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
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


class App:
    """Holds the tasks a worker can run. Handlers are looked up by name only.

    >>> app = pgqueue.App()
    >>> @app.task(queue="email", max_attempts=10, timeout=30)
    ... def send_receipt(job, order_id: int): ...
    """

    def __init__(self, *, schema: str | None = None) -> None:
        self.schema = schema
        self.tasks: dict[str, Task[Any, Any]] = {}

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
    ) -> Any:
        """Register a handler. The task name defaults to the function's ``__name__``.

        ``timeout`` (seconds or timedelta) is the hard limit of one attempt; ``retry`` the
        backoff policy; ``non_retryable`` exception types skip retries and dead-letter.
        ``dead_blocks_key``: when a job with an ordering key is dead-lettered, the later jobs
        of its key wait until an operator requeues or discards it (True, the default), or go
        on without it (False).
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError("max_attempts must be an int >= 1")
        timeout_seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        if timeout_seconds is not None and not timeout_seconds > 0:
            raise ValueError("timeout must be a positive number of seconds or a timedelta")
        errors = tuple(non_retryable)

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
                schema=self.schema,
            )
            if task.name in self.tasks:
                raise ValueError(f"task {task.name!r} is registered twice; pass name=... to one")
            self.tasks[task.name] = task
            return task

        return register(function) if function is not None else register

    def queues(self) -> list[str]:
        """The queues named by the registered tasks, sorted."""
        return sorted({task.queue for task in self.tasks.values()})
