"""Bulk enqueue by COPY: the rows of many plain jobs, as text, streamed while they are encoded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pgqueue.names import task_name
from pgqueue.payload import encode

# From this many plain jobs (no ordering or unique key) on, enqueue_many uses COPY.
COPY_THRESHOLD = 1000
# Rows per write: large enough that a write is cheap, small enough that the server parses
# one chunk while Python encodes the next (the two run on different cores).
CHUNK_ROWS = 2000
_BACKSLASH, _DOUBLED = "\\", "\\\\"
_NULL = "\\N"


def is_copyable(params: Mapping[str, list[Any]]) -> bool:
    """Whether validated columns (see ``enqueue.build``) can go in by COPY."""
    return (
        len(params["task"]) >= COPY_THRESHOLD
        and not any(params["ordering_key"])
        and not any(params["unique_key"])
    )


def prepare_request(queue_of_each: Sequence[str]) -> dict[str, Any]:
    """Parameters of ``prepare_bulk_enqueue``: per-queue counts (depth check) and the total."""
    counts = Counter(queue_of_each)
    queues = sorted(counts)
    return {
        "queues": queues,
        "queue_counts": [counts[q] for q in queues],
        "ready_queues": queues,
        "count": len(queue_of_each),
    }


def _is_default(row: Mapping[str, Any]) -> bool:
    """A job that keeps every column default: only id, queue, task and args need to travel."""
    return (
        row["max_attempts"] is None
        and row["timeout_seconds"] is None
        and row["run_at"] is None
        and not row["delay"]
        and not row["priority"]
        and row["headers"] == "{}"
    )


def _options_text(row: Mapping[str, Any], db_now: datetime) -> str:
    """headers, priority, run_at, max_attempts and timeout_seconds of one row, COPY text."""
    if row["run_at"] is not None:
        when = row["run_at"].isoformat()
    elif row["delay"]:
        when = (db_now + timedelta(seconds=row["delay"])).isoformat()
    else:
        when = db_now.isoformat()
    return "\t".join(
        (
            row["headers"].replace(_BACKSLASH, _DOUBLED),
            str(row["priority"]),
            when,
            _NULL if row["max_attempts"] is None else str(row["max_attempts"]),
            _NULL if row["timeout_seconds"] is None else repr(row["timeout_seconds"]),
        )
    )


def copy_text(
    params: Mapping[str, list[Any]], db_now: datetime, ids: Sequence[int]
) -> tuple[str, Iterator[str]]:
    """The COPY query's name and its rows in text format, for already validated columns.

    JSON never holds raw tabs or newlines (the encoder escapes them), so doubling
    backslashes is the only escaping COPY needs; names are allow-listed. When every job
    keeps the defaults only id, queue, task and args travel: the server then parses no
    timestamp and no second jsonb per row.
    """
    names = ("headers", "priority", "run_at", "delay", "max_attempts", "timeout_seconds")
    columns = [params[name] for name in names]
    rows = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
    plain = all(_is_default(row) for row in rows)
    lines = []
    for job_id, queue, task, args, row in zip(
        ids, params["queue"], params["task"], params["args"], rows, strict=True
    ):
        line = f"{job_id}\t{queue}\t{task}\t{args.replace(_BACKSLASH, _DOUBLED)}"
        lines.append(line if plain else f"{line}\t{_options_text(row, db_now)}")
    lines.append("")
    return ("copy_plain_jobs" if plain else "copy_jobs"), iter(("\n".join(lines),))


def encode_plain(task: str, args: Any, known_tasks: set[str], max_payload_bytes: int) -> str:
    """The JSON text of one ``(task, args)`` job's arguments, after checking both.

    ``known_tasks`` caches the task names already checked in this call.
    """
    if task not in known_tasks:
        task_name(task)
        known_tasks.add(task)
    if not isinstance(args, Mapping):
        raise TypeError(
            f"args of task {task!r} must be a mapping of keyword arguments, "
            f"got {type(args).__name__}"
        )
    return encode(args, what="args", max_bytes=max_payload_bytes)


class TupleStream:
    """(task, args) tuples sharing one set of options, encoded chunk by chunk during the COPY.

    Validating every job before any SQL would leave the server idle while Python encodes
    and then Python idle while the server parses. Here both work at once; a bad item found
    mid-stream aborts the COPY, and the caller's savepoint takes back everything the call
    wrote (ids drawn, NOTIFY, the rows already sent).
    """

    def __init__(
        self,
        items: Sequence[tuple[str, Mapping[str, Any]]],
        options: Mapping[str, Any],
        max_payload_bytes: int,
    ) -> None:
        self.items = items
        self.options = options
        self.max_payload_bytes = max_payload_bytes

    @classmethod
    def of(
        cls,
        items: Sequence[Any],
        options: Mapping[str, Any],
        max_payload_bytes: int,
    ) -> TupleStream | None:
        """A stream when every item is a tuple and the shared options allow COPY, else None.

        ``options`` is a validated row of the shared options (see ``enqueue._row``).
        """
        if len(items) < COPY_THRESHOLD or options["ordering_key"] or options["unique_key"]:
            return None
        if not all(type(item) is tuple for item in items):
            return None
        return cls(items, options, max_payload_bytes)

    def request(self) -> dict[str, Any]:
        return prepare_request([self.options["queue"]] * len(self.items))

    def chunks(self, db_now: datetime, ids: Sequence[int]) -> tuple[str, Iterator[str]]:
        """The COPY query's name and a generator of text chunks (raises on a bad item)."""
        plain = _is_default(self.options)
        tail = "" if plain else "\t" + _options_text(self.options, db_now)
        return ("copy_plain_jobs" if plain else "copy_jobs"), self._generate(ids, tail)

    def _generate(self, ids: Sequence[int], tail: str) -> Iterator[str]:
        queue = self.options["queue"]
        known: set[str] = set()
        items, limit = self.items, self.max_payload_bytes
        for start in range(0, len(items), CHUNK_ROWS):
            part = []
            for index in range(start, min(start + CHUNK_ROWS, len(items))):
                item = items[index]
                try:
                    if len(item) != 2:
                        raise TypeError("each job must be a JobSpec or a (task, args) tuple")
                    task, args = item
                    text = encode_plain(task, args, known, limit)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"jobs[{index}]: {exc}") from None
                part.append(
                    f"{ids[index]}\t{queue}\t{task}\t{text.replace(_BACKSLASH, _DOUBLED)}{tail}\n"
                )
            yield "".join(part)
