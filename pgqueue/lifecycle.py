"""The last steps of a worker or relay, each bounded so an unreachable database cannot
hold the process past its grace period."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterable
from typing import Any, Protocol
from uuid import UUID

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
