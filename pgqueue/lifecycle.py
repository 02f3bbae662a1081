"""How a worker or relay starts and stops: the events its loops wait on, signals, the order
of shutdown, and the last steps, each bounded so an unreachable database cannot hold the
process past its grace period."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from pgqueue.errors import ConfigurationError
from pgqueue.timeouts import within

log = logging.getLogger("pgqueue")


def freeze_startup_heap() -> bool:
    """Exempt the objects alive at start-up (modules, the app, its imports) from the cyclic GC.

    A drain allocates a few container objects per job, so the collector runs often, and each
    of its oldest-generation passes re-scanned everything the process had imported: about
    2 us per no-op job, a fifth of the worker's CPU (``bench/cpu_split.py``). Objects made
    later are collected as usual. Returns whether it froze: not when something in the process
    (a pre-fork server, another worker) froze first, whose freeze is left alone.
    """
    if gc.get_freeze_count():
        return False
    gc.collect()
    gc.freeze()
    return True


def thaw_heap(frozen: bool) -> None:
    """Undo :func:`freeze_startup_heap` when the worker or relay stops: a process that starts
    and stops workers must not keep their cyclic garbage forever."""
    if frozen:
        gc.unfreeze()


EVENT_LOOPS = ("auto", "asyncio", "uvloop")
T = TypeVar("T")


def check_event_loop(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of EVENT_LOOPS (for the settings)."""
    if name not in EVENT_LOOPS:
        raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, not {name!r}")


def run_event_loop(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """``asyncio.run(main)`` on the event loop named (one of EVENT_LOOPS).

    ``auto`` takes uvloop when it is installed (``pip install 'pgqueue[uvloop]'``) and the
    standard loop otherwise. uvloop's C event loop and transports cut the relay's CPU per
    delivery by about a tenth (bench/RESULTS.md); ``asyncio`` keeps the standard loop.
    """
    try:
        check_event_loop(event_loop)
    except ValueError:
        main.close()  # never run: no "coroutine was never awaited" warning
        raise
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise ConfigurationError(
                    "event_loop 'uvloop' needs the uvloop package: pip install "
                    "'pgqueue[uvloop]' (or choose 'auto' or 'asyncio')"
                ) from None
        else:
            result: T = uvloop.run(main)
            return result
    return asyncio.run(main)


class _Lanes(Protocol):
    def close(self) -> None: ...


class _ClaimStore(Protocol):
    def stop_retrying(self) -> None: ...


StoreT = TypeVar("StoreT", bound=_ClaimStore)


class ClaimingProcess(Generic[StoreT]):
    """The start and stop a worker and a relay share (each claims, runs on lanes, drains).

    Subclasses set ``store`` and ``_lanes``, call :meth:`_init_lifecycle` in ``__init__``
    and implement ``_on_signal`` (the first SIGTERM/SIGINT; a second exits at once).
    """

    store: StoreT
    _lanes: _Lanes
    exit_code: int

    def _init_lifecycle(self) -> None:
        self._stopping = False
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set when a claim may find something new (NOTIFY, a settled key, shutdown).
        self._wake: asyncio.Event | None = None
        # Set when a lane frees up (and at shutdown).
        self._capacity: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None

    def request_stop(self) -> None:
        """Begin a graceful shutdown; safe to call from any thread, even before ``run``."""
        self._stop_requested = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    def _on_signal(self, signum: int) -> None:
        raise NotImplementedError

    def _schema_error(self, exc: Exception) -> None:
        """Outcomes cannot be written with this schema (older than the code): stop, exit 3.

        Claiming on would only pile up work whose results cannot be recorded.
        """
        self.exit_code = 3
        assert self._stop_event is not None
        self._stop_event.set()

    def _start_lifecycle(self, install_signals: bool) -> None:
        """Create the events on the running loop; route SIGTERM/SIGINT to ``_on_signal``."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._capacity = asyncio.Event()
        self._stop_event = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(signum, self._on_signal, signum)

    def _stop_claiming(self) -> None:
        """Shutdown began: no new claims, lanes take nothing new, waiting loops see it."""
        assert self._wake is not None and self._capacity is not None
        self._stopping = True
        self._lanes.close()
        self._wake.set()
        self._capacity.set()
        self.store.stop_retrying()

    async def _wait_after_claim(
        self, claimed_any: bool, *, listens: bool, poll_seconds: float
    ) -> None:
        """Between claims that did not fill their batch: wait for a NOTIFY, at most a poll.

        A short batch took everything ready at the claim. Work enqueued or published since,
        and keys moved on, send a NOTIFY, which has set ``_wake`` already; the rest (a retry
        or a release by another process, a run_at reached, a rescue) waits for the poll, as
        after an empty claim. Claiming again at once would cost a round trip and be sent
        before what was just claimed starts. Without LISTEN (``listens`` false) nothing sets
        ``_wake``, so a claim that took something is followed by another at once.
        """
        assert self._wake is not None
        if claimed_any and not listens:
            return
        try:
            await within(self._wake.wait(), poll_seconds)
        except asyncio.TimeoutError:
            pass

    async def _claim_until_stopped(
        self, fetch_loop: Coroutine[Any, Any, None], drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``fetch_loop`` until it ends or a stop is requested, then shut down in order:
        stop claiming, let a claim under way return (at most a second), ``drain``.

        A claim under way normally returns within a round trip; one stuck reconnecting to an
        unreachable database is cancelled (its leases expire; rescue follows). An unexpected
        error that ended the fetch loop is raised once claiming stopped, and the drain is
        skipped: what was in flight then goes back to the queue when its leases expire.
        """
        assert self._stop_event is not None
        fetch = asyncio.create_task(fetch_loop, name="fetch")
        stopped = asyncio.create_task(self._stop_event.wait())
        await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        self._stop_claiming()
        done, _ = await asyncio.wait({fetch}, timeout=1.0)
        if not done:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
        stopped.cancel()
        if not fetch.cancelled() and fetch.exception() is not None:
            fetch.result()
        await drain()


class _Stoppable(Protocol):
    def stop(self) -> None: ...
    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...


class _Store(Protocol):
    async def execute(self, name: str, params: Any) -> Any: ...


async def wind_down(
    tasks: Iterable[asyncio.Task[Any]],
    heartbeat: _Stoppable,
    store: _Store,
    process_id: UUID,
    *,
    seconds: float = 2.0,
) -> None:
    """Cancel ``tasks``, stop the heartbeat thread and unregister ``process_id``.

    Each step waits at most ``seconds`` and gives up quietly: a task that does not finish
    when cancelled (a connect in flight to a silent server) is left behind, the heartbeat
    thread is a daemon, and an unregistered process row is pruned by the others later.
    """
    heartbeat.stop()
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        _, stuck = await asyncio.wait(pending, timeout=seconds)
        if stuck:
            log.warning("%d background tasks did not stop in %gs; left behind", len(stuck), seconds)
    if heartbeat.is_alive():
        await asyncio.to_thread(heartbeat.join, seconds)
    unregister = asyncio.ensure_future(store.execute("unregister_process", {"id": process_id}))
    done, _ = await asyncio.wait({unregister}, timeout=seconds)
    if done:
        if not unregister.cancelled():
            unregister.exception()  # retrieved: a failure here only means the row stays
    else:
        unregister.cancel()
