"""The app the chaos tests (tests/faults/test_chaos.py) run in real `pgqueue worker` processes.

Every run of a handler appends JSON lines to a ledger file of its own process,
``$CHAOS_LEDGER_DIR/ledger-<pid>.jsonl``: one ``start`` line before the handler does
anything, one ``end`` line when it returns normally (so before its ack can be written), one
``error`` line when it raises. A line is written with one ``write(2)`` on an ``O_APPEND``
descriptor: it is in the kernel before the handler goes on, so neither SIGKILL nor a
PostgreSQL that is down loses it, and the ledger costs no database round trip. Times are
``time.monotonic()``, which is one clock for every process of the machine (faketime is told
to leave it alone), so runs in different workers can be compared.

``CHAOS_LEDGER_DIR`` is required; ``PGQUEUE_DSN`` is needed for ``db_clock`` jobs only.

Tasks (queue ``chaos``):

- ``chaos(n, sleep=0, mode="ok", db_clock=False)``: ``mode`` is ``ok``, ``raise`` (always
  fails), ``exit`` (``os._exit(3)``: the whole worker dies mid-job) or ``system_exit``
  (``raise SystemExit(2)`` in a handler thread); ``db_clock`` adds the database's
  ``clock_timestamp()`` at start to the ``start`` line (the clock-skew test).
- ``chaos_async(n, sleep=0, mode="ok")``: the same as an ``async def`` handler (on the
  worker's event loop), where ``system_exit`` raises ``SystemExit`` inside a coroutine.

    CHAOS_LEDGER_DIR=/tmp/ledger PGQUEUE_DSN=... \\
        pgqueue worker --app tests.apps.chaos_app:app --queue chaos
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

import psycopg

from pgqueue import App, Job, RetryPolicy

QUEUE = "chaos"
MODES = ("ok", "raise", "exit", "system_exit")
FAST_RETRY = RetryPolicy(base_seconds=0.05, max_seconds=0.5)

app = App()
_ledger_fd: int | None = None


def _fd() -> int:
    global _ledger_fd
    if _ledger_fd is None:
        folder = os.environ["CHAOS_LEDGER_DIR"]
        path = os.path.join(folder, f"ledger-{os.getpid()}.jsonl")
        _ledger_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return _ledger_fd


def record(job: Job, event: str, **extra: Any) -> None:
    """Append one ledger line for ``job`` (one write: whole, even if SIGKILL follows)."""
    worker = getattr(job._provider, "id", None)
    line = {
        "e": event,
        "job": job.id,
        "att": job.attempt,
        "max": job.max_attempts,
        "tok": job.lease_token.hex,
        "wid": str(worker) if worker is not None else None,
        "pid": os.getpid(),
        "key": job.ordering_key,
        "n": job.args.get("n"),
        "t": time.monotonic(),
        **extra,
    }
    os.write(_fd(), (json.dumps(line, separators=(",", ":")) + "\n").encode())


def _db_now() -> str:
    with psycopg.connect(os.environ["PGQUEUE_DSN"], autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return str(row[0].isoformat())


def _misbehave(job: Job, mode: str) -> None:
    if mode == "exit":
        os._exit(3)  # no cleanup, no ack, no 'end'
    if mode == "raise":
        raise RuntimeError(f"poison job {job.id} always fails (attempt {job.attempt})")
    if mode == "system_exit":
        raise SystemExit(2)


@app.task(queue=QUEUE, max_attempts=20, retry=FAST_RETRY)
def chaos(
    job: Job, n: int = 0, sleep: float = 0.0, mode: str = "ok", db_clock: bool = False
) -> None:
    """Record 'start'; misbehave as ``mode`` says, or sleep; record 'end' or 'error'."""
    record(job, "start", **({"db": _db_now()} if db_clock else {}))
    try:
        _misbehave(job, mode)
        if sleep:
            time.sleep(sleep)
    except BaseException as exc:
        record(job, "error", error=type(exc).__name__)
        raise
    record(job, "end")


@app.task(queue=QUEUE, max_attempts=20, retry=FAST_RETRY)
async def chaos_async(job: Job, n: int = 0, sleep: float = 0.0, mode: str = "ok") -> None:
    """The coroutine twin of :func:`chaos` (no ``db_clock``)."""
    record(job, "start")
    try:
        _misbehave(job, mode)
        if sleep:
            await asyncio.sleep(sleep)
    except BaseException as exc:
        record(job, "error", error=type(exc).__name__)
        raise
    record(job, "end")


def _dump_asyncio_tasks(signum: int, frame: FrameType | None) -> None:
    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:
        return
    for task in tasks:
        task.print_stack(file=sys.stderr)


# As in fault_app: `kill -USR1` dumps every thread's stack, `kill -USR2` every asyncio task's
# (WorkerProcess.wait does both to a worker that does not exit in time).
faulthandler.register(signal.SIGUSR1, all_threads=True)
signal.signal(signal.SIGUSR2, _dump_asyncio_tasks)
