"""Sync handlers on threads: a pool, a hard timeout, and interrupting a thread past it."""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class JobTimeout(Exception):
    """A handler ran past its hard timeout."""


def interrupt_thread(thread_ident: int, exception: type[BaseException]) -> bool:
    """Raise ``exception`` inside the thread at its next Python bytecode.

    A thread blocked inside a C call (a socket read, ``time.sleep``) only sees it when the
    call returns; the worker stops waiting for it either way and counts it as abandoned.
    Returns True when the exception was scheduled.
    """
    scheduled = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_ident), ctypes.py_object(exception)
    )
    if scheduled > 1:  # more than one thread state matched: undo, as the C API asks
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_ident), None)
        return False
    return bool(scheduled == 1)


class HandlerThreads:
    """Runs sync handlers on a pool of ``size`` threads, each call under its own timeout.

    A call past its timeout raises :class:`JobTimeout` in the caller at once; its thread is
    interrupted (see :func:`interrupt_thread`) and counted in ``abandoned`` until it ends.
    """

    def __init__(self, size: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="pgqueue-job")
        self.abandoned = 0

    async def call(
        self,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        """``function(*args, **kwargs)`` on a pool thread, awaited from the event loop."""
        slot: dict[str, Any] = {"lock": threading.Lock()}

        def call() -> Any:
            with slot["lock"]:
                slot["ident"] = threading.get_ident()
            try:
                return function(*args, **kwargs)
            finally:
                with slot["lock"]:
                    slot["done"] = True

        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            self._abandon(slot, future)
            raise JobTimeout(f"handler ran past its timeout of {timeout:g}s") from None

    def _abandon(self, slot: dict[str, Any], future: asyncio.Future[Any]) -> None:
        """Give up on a call past its timeout: interrupt its thread and stop waiting."""
        with slot["lock"]:
            if not slot.get("done") and "ident" in slot:
                interrupt_thread(slot["ident"], JobTimeout)
        self.abandoned += 1

        def finished(_: asyncio.Future[Any]) -> None:
            self.abandoned -= 1

        future.add_done_callback(finished)

    def shutdown(self) -> None:
        """Stop taking calls; threads still running finish on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
