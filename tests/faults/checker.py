"""A Jepsen-style checker for the fault suite: what was committed against what really ran.

The tests feed it three histories and get back a :class:`Report`:

1. what the producers did (:class:`Produced`): every job id (or message id) with the fate of
   its transaction: committed, rolled back, or unknown (the connection died during COMMIT:
   the job may exist or not, and both are correct);
2. what the handlers really did: the ledger lines of tests/apps/chaos_app.py (:func:`read_runs`),
   or the requests a receiver got (:class:`Delivery`);
3. what the database says after the final drain (:func:`read_job_state`,
   :func:`read_outbox_state`): rows still queued, dead letters, and, when job events are
   recorded (``pgqueue audit job-events on``), which attempt of which worker was acked.

Every job or message is classified as **completed** (delivered), **dead-lettered**,
**lost** (committed, but neither completed nor dead-lettered after the drain),
**duplicated** (completed, and its handler finished more than once: allowed by
at-least-once when the earlier run was never acked) or **unexpected** (ran, but was never
committed: a rolled-back job, or an id nobody enqueued). Invariants, each a list of
violations in ``Report.violations`` (empty lists are left out):

- ``lost``: no committed job is lost;
- ``rolled back but ran`` / ``never enqueued but ran``: no unexpected run;
- ``completed twice``: at most one ack per job; never both acked and dead-lettered;
- ``acked without a finished run``: the acked attempt is one whose handler returned;
- ``ran again after its ack``: no run of an attempt later than the acked one;
- ``overlapping runs``: two runs of one job overlap in time only if the earlier one had lost
  its lease (a later attempt took over) and was not the one acked;
- ``left running``: no job is still running with a lease expired longer ago than the
  rescue interval (plus slack);
- ``attempts exceeded`` / ``dead-lettered before its attempts``: attempts never exceed the
  maximum, and a job is dead-lettered for attempts only once it used them all;
- ``unexpected outcome``: a job meant to complete was dead-lettered, or a poison job completed;
- ``key order``: the jobs of one ordering key run one at a time, in commit order;
- ``ran early``: no run started (database clock) before the job's ``run_at``.

For messages: ``lost``, ``unexpected``, ``payload changed``, ``key order`` (a crashed relay may
replay the suffix of a key it already delivered, nothing else), ``sent but never received``,
``more deliveries than attempts`` (a redelivery needs a new claim, which counts an attempt).

``Report.summary()`` is the one-line verdict; :func:`results_table` prints rows of
scenario, jobs or messages, lost, duplicated, unexpected and invocation.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

Fate = Literal["committed", "rolled_back", "unknown"]
Expectation = Literal["complete", "dead", "any"]
EXAMPLES = 10  # violations kept per invariant (the count is always exact)


# ------------------------------------------------------------------ histories


@dataclass
class Item:
    """One job or message a producer tried to enqueue or publish."""

    id: Any  # job id (int) or message id (str)
    fate: Fate
    key: str | None = None
    seq: int | None = None  # position in its key, in commit order
    expect: Expectation = "complete"
    payload: Any = None  # messages: what the receiver must get
    not_before: datetime | None = None  # jobs: run_at (database clock)


class Produced:
    """What producers did, shared by their threads (appends are atomic under the GIL)."""

    def __init__(self) -> None:
        self.items: dict[Any, Item] = {}

    def add(self, items: Iterable[Item]) -> None:
        for item in items:
            self.items[item.id] = item

    def settle(self, ids: Iterable[Any], fate: Fate) -> None:
        for item_id in ids:
            self.items[item_id].fate = fate

    def ids(self, *fates: Fate) -> set[Any]:
        return {i for i, item in self.items.items() if item.fate in fates}


@dataclass
class Run:
    """One execution of a handler, from the chaos_app ledger."""

    job_id: int
    attempt: int
    max_attempts: int
    token: str
    worker_id: str | None
    pid: int
    start: float  # time.monotonic(), one clock for all processes
    finish: float | None = None  # end or error line
    outcome: str = "vanished"  # end, error, vanished (the process died or never returned)
    error: str | None = None
    key: str | None = None
    n: Any = None
    db_start: datetime | None = None

    def stop(self, deaths: Mapping[int, float]) -> float:
        """When the run was over for sure: its last line, else its process's death."""
        if self.finish is not None:
            return self.finish
        return deaths.get(self.pid, math.inf)


def read_runs(folder: Path) -> list[Run]:
    """Every run in the ledger files of ``folder`` (a start line, then maybe end/error)."""
    runs: dict[tuple[int, str], Run] = {}
    for path in sorted(folder.glob("ledger-*.jsonl")):
        text = path.read_text()
        # A line is one write(2), but a reader can catch it half copied (the file grows a
        # page at a time): a last line without its newline is read on the next call.
        for line in text[: text.rfind("\n") + 1].splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            key = (entry["job"], entry["tok"])
            if entry["e"] == "start":
                runs[key] = Run(
                    job_id=entry["job"],
                    attempt=entry["att"],
                    max_attempts=entry["max"],
                    token=entry["tok"],
                    worker_id=entry.get("wid"),
                    pid=entry["pid"],
                    start=entry["t"],
                    key=entry.get("key"),
                    n=entry.get("n"),
                    db_start=datetime.fromisoformat(entry["db"]) if "db" in entry else None,
                )
            else:
                run = runs[key]
                run.finish, run.outcome, run.error = entry["t"], entry["e"], entry.get("error")
    return sorted(runs.values(), key=lambda r: r.start)


@dataclass
class Ack:
    attempt: int
    worker_id: str | None


@dataclass
class JobState:
    """pgqueue's tables after the final drain."""

    remaining: dict[int, dict[str, Any]]
    dead: dict[int, dict[str, Any]]
    acks: dict[int, list[Ack]] | None  # None: job events were not recorded
    dead_events: dict[int, int] = field(default_factory=dict)


def read_job_state(dsn: str, schema: str = "pgqueue") -> JobState:
    """Rows left in ``jobs`` (with ``expired_for``, seconds since a running lease expired),
    dead letters, and the completion events when job events are recorded."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        remaining = {
            row["id"]: row
            for row in conn.execute(
                f"SELECT id, state, attempts, max_attempts, ordering_key, run_at,"
                f" extract(epoch FROM now() - lease_expires_at)::float8 AS expired_for"
                f" FROM {schema}.jobs"
            )
        }
        dead = {
            row["id"]: row
            for row in conn.execute(
                f"SELECT id, task, attempts, max_attempts, reason, last_error, args::text AS args"
                f" FROM {schema}.dead_jobs"
            )
        }
        triggers = conn.execute(
            "SELECT count(*) AS n FROM pg_trigger"
            " WHERE tgrelid = to_regclass(%s) AND tgname LIKE 'jobs_record_events_%%'",
            [f"{schema}.jobs"],
        ).fetchone()
        acks: dict[int, list[Ack]] | None = None
        dead_events: dict[int, int] = {}
        if triggers is not None and triggers["n"] == 3:
            acks = defaultdict(list)
            for row in conn.execute(
                f"SELECT job_id, attempt, worker_id::text AS worker_id, event"
                f" FROM {schema}.job_events WHERE event IN ('completed', 'dead_lettered')"
                f" ORDER BY id"
            ):
                if row["event"] == "completed":
                    acks[row["job_id"]].append(Ack(row["attempt"], row["worker_id"]))
                else:
                    dead_events[row["job_id"]] = row["attempt"]
    return JobState(remaining, dead, acks, dead_events)


def enable_job_events(dsn: str, schema: str = "pgqueue") -> None:
    """``pgqueue audit job-events on``: the checker then knows which attempt was acked."""
    from pgqueue.cli.admin import switch_job_events

    with psycopg.connect(dsn, autocommit=True) as conn:
        switch_job_events(conn, schema, True)


# ------------------------------------------------------------------ the report


@dataclass
class Report:
    scenario: str
    kind: str  # "jobs" or "messages"
    total: int  # committed (plus unknown ones that turned out to exist)
    runs: int  # handler runs, or deliveries
    # Tallied by the check that builds the report.
    completed: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    indeterminate: int = 0  # commit outcome unknown
    invocation: str = ""
    notes: list[str] = field(default_factory=list)
    violations: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # exact violation counts

    @property
    def ok(self) -> bool:
        return not self.violations

    def violate(self, invariant: str, detail: str) -> None:
        self.counts[invariant] = self.counts.get(invariant, 0) + 1
        found = self.violations.setdefault(invariant, [])
        if len(found) < EXAMPLES:
            found.append(detail)

    def summary(self) -> str:
        verdict = (
            "invariants hold"
            if self.ok
            else "VIOLATED: " + ", ".join(f"{k} ({n})" for k, n in self.counts.items())
        )
        extra = f", {self.indeterminate} indeterminate" if self.indeterminate else ""
        return (
            f"{self.scenario}: {self.total} {self.kind}, {self.completed} completed, "
            f"{self.dead_lettered} dead-lettered, {self.lost} lost, {self.duplicated} "
            f"duplicated, {self.unexpected} unexpected, {self.runs} runs{extra}; {verdict}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "kind": self.kind,
            "total": self.total,
            "completed": self.completed,
            "dead_lettered": self.dead_lettered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "runs": self.runs,
            "indeterminate": self.indeterminate,
            "invocation": self.invocation,
            "notes": list(self.notes),
            "violations": {k: list(v) for k, v in self.violations.items()},
            "counts": dict(self.counts),
            "ok": self.ok,
        }

    def explain(self) -> str:
        """The summary plus examples of each violation, for assertion messages."""
        lines = [self.summary(), *self.notes]
        for invariant, examples in self.violations.items():
            lines.append(f"  {invariant} ({self.counts[invariant]}):")
            lines.extend(f"    {example}" for example in examples)
        return "\n".join(lines)


def results_table(reports: Sequence[Report]) -> str:
    """A Markdown table: scenario, jobs or messages, lost, duplicated, unexpected, how run."""
    header = (
        "| scenario | jobs or messages | completed | dead-lettered | lost | duplicated "
        "| unexpected | runs | verdict | invocation |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in reports:
        verdict = "ok" if r.ok else "FAIL: " + ", ".join(r.counts)
        lines.append(
            f"| {r.scenario} | {r.total} {r.kind} | {r.completed} | {r.dead_lettered} "
            f"| {r.lost} | {r.duplicated} | {r.unexpected} | {r.runs} | {verdict} "
            f"| `{r.invocation}` |"
        )
    return "\n".join(lines)


def invocation() -> str:
    """How this run was invoked: the server, soak mode and the pytest test id."""
    server = os.environ.get("PGQUEUE_TEST_PG_BIN") or "embedded PG (default)"
    soak = " PGQUEUE_SOAK=1" if os.environ.get("PGQUEUE_SOAK") == "1" else ""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    return f"{server}{soak} pytest {test}".strip()


def emit(report: Report) -> None:
    """Print the report's table row and summary (``pytest -s`` shows them)."""
    sys.stdout.write("\n" + results_table([report]) + "\n" + report.explain() + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ jobs


def check_jobs(
    scenario: str,
    produced: Produced,
    runs: Sequence[Run],
    state: JobState,
    *,
    deaths: Mapping[int, float] | None = None,
    rescue_slack_seconds: float = 5.0,
) -> Report:
    """Classify every job and check the job invariants listed in the module docstring.

    ``deaths``: pid -> time.monotonic() when the test killed (or saw the death of) that
    worker; a run with no end line is over by then. ``rescue_slack_seconds``: how long past
    its lease's expiry a job may still be running at the end (the rescue interval + slack).
    """
    deaths = deaths or {}
    items = produced.items
    by_job: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.job_id].append(run)
    committed = produced.ids("committed")
    unknown = produced.ids("unknown")
    # An unknown commit that left any trace (a run, a row, a dead letter) did commit.
    surfaced = {
        i
        for i in unknown
        if i in by_job or i in state.remaining or i in state.dead or (state.acks or {}).get(i)
    }
    expected = committed | surfaced
    report = Report(
        scenario,
        "jobs",
        total=len(expected),
        runs=len(runs),
        indeterminate=len(unknown),
        invocation=invocation(),
    )
    if unknown:
        report.notes.append(
            f"{len(unknown)} jobs had an unknown commit outcome; {len(surfaced)} of them exist"
        )

    # Unexpected: runs of jobs that were never committed.
    for job_id in sorted(set(by_job) - expected):
        report.unexpected += 1
        item = items.get(job_id)
        if item is not None and item.fate == "rolled_back":
            report.violate("rolled back but ran", f"job {job_id} ({len(by_job[job_id])} runs)")
        else:
            report.violate("never enqueued but ran", f"job {job_id}")

    acked_run: dict[int, Run] = {}
    for job_id in sorted(expected):
        job_runs = by_job.get(job_id, [])
        ends = [r for r in job_runs if r.outcome == "end"]
        item = items[job_id]
        acks = None if state.acks is None else state.acks.get(job_id, [])
        is_dead = job_id in state.dead
        if acks is not None:
            is_completed = bool(acks)
        else:
            is_completed = job_id not in state.remaining and not is_dead and bool(ends)
        if is_completed:
            report.completed += 1
        if is_dead:
            report.dead_lettered += 1
        if not is_completed and not is_dead:
            report.lost += 1
            where = state.remaining.get(job_id)
            status = f"still {where['state']}" if where else "gone without an ack"
            report.violate("lost", f"job {job_id}: {status}, runs {_describe(job_runs)}")
        if len(ends) > 1 and is_completed:
            report.duplicated += 1
        if acks is not None and (len(acks) > 1 or (acks and is_dead)):
            report.violate("completed twice", f"job {job_id}: acks {acks}, dead {is_dead}")
        if acks:
            ack = acks[0]
            finished = [
                r
                for r in ends
                if r.attempt == ack.attempt
                and (ack.worker_id is None or r.worker_id == ack.worker_id)
            ]
            if not finished:
                report.violate(
                    "acked without a finished run",
                    f"job {job_id}: attempt {ack.attempt} by {ack.worker_id} acked; "
                    f"runs {_describe(job_runs)}",
                )
            else:
                acked_run[job_id] = finished[-1]
            later = [r for r in job_runs if r.attempt > ack.attempt]
            if later:
                report.violate(
                    "ran again after its ack",
                    f"job {job_id}: acked attempt {ack.attempt}, later {_describe(later)}",
                )
        elif ends and not is_dead and acks is None:
            acked_run[job_id] = ends[-1]
        _check_attempts(report, job_id, job_runs, state.dead.get(job_id))
        _check_overlaps(report, job_id, job_runs, acked_run.get(job_id), deaths)
        if item.expect == "complete" and is_dead:
            dead = state.dead[job_id]
            report.violate(
                "unexpected outcome",
                f"job {job_id} was meant to complete but is dead ({dead['reason']}: "
                f"{(dead['last_error'] or '').splitlines()[:1]})",
            )
        if item.expect == "dead" and is_completed:
            report.violate("unexpected outcome", f"poison job {job_id} completed")
        if item.not_before is not None:
            for run in job_runs:
                if run.db_start is not None and run.db_start < item.not_before:
                    report.violate(
                        "ran early",
                        f"job {job_id} attempt {run.attempt} started {run.db_start} "
                        f"(database clock), before its run_at {item.not_before}",
                    )

    for job_id, row in sorted(state.remaining.items()):
        expired_for = row["expired_for"]
        if row["state"] == "running" and expired_for is not None:
            if expired_for > rescue_slack_seconds:
                report.violate(
                    "left running",
                    f"job {job_id}: lease expired {expired_for:.1f}s ago, not rescued",
                )

    _check_job_key_order(report, produced, by_job, acked_run, state, deaths)
    return report


def _describe(runs: Sequence[Run]) -> str:
    return "[" + ", ".join(f"#{r.attempt}@{r.pid}:{r.outcome}" for r in runs) + "]"


def _check_attempts(
    report: Report, job_id: int, runs: Sequence[Run], dead: Mapping[str, Any] | None
) -> None:
    for run in runs:
        if run.attempt > run.max_attempts:
            report.violate(
                "attempts exceeded",
                f"job {job_id} ran attempt {run.attempt} of {run.max_attempts}",
            )
    if dead is None:
        return
    if dead["attempts"] > (dead["max_attempts"] or math.inf):
        report.violate(
            "attempts exceeded",
            f"job {job_id} dead with {dead['attempts']} of {dead['max_attempts']} attempts",
        )
    if dead["reason"] in ("max_attempts", "lease_expired") and dead["attempts"] < (
        dead["max_attempts"] or 0
    ):
        report.violate(
            "dead-lettered before its attempts",
            f"job {job_id}: {dead['reason']} after {dead['attempts']} of {dead['max_attempts']}",
        )


def _check_overlaps(
    report: Report,
    job_id: int,
    runs: Sequence[Run],
    acked: Run | None,
    deaths: Mapping[int, float],
) -> None:
    ordered = sorted(runs, key=lambda r: r.start)
    for index, first in enumerate(ordered):
        for second in ordered[index + 1 :]:
            if second.start >= first.stop(deaths):
                continue
            # The second run began while the first was still going. Allowed only when the
            # first had lost its lease (a later claim took the job over) and its result was
            # not the one acknowledged.
            if second.attempt > first.attempt and first is not acked:
                continue
            if second.token == first.token:
                problem = "the same claim ran twice"
            elif first is acked:
                problem = "the earlier run was the one acked"
            else:
                problem = "the later run is not a later attempt"
            report.violate(
                "overlapping runs",
                f"job {job_id}: attempt {first.attempt} (pid {first.pid}) and attempt "
                f"{second.attempt} (pid {second.pid}) overlap: {problem}",
            )


def _check_job_key_order(
    report: Report,
    produced: Produced,
    by_job: Mapping[int, Sequence[Run]],
    acked_run: Mapping[int, Run],
    state: JobState,
    deaths: Mapping[int, float],
) -> None:
    keys: dict[str, list[Item]] = defaultdict(list)
    for item in produced.items.values():
        if item.key is not None and (
            item.fate == "committed" or item.id in by_job or item.id in state.dead
        ):
            keys[item.key].append(item)
    for key, members in keys.items():
        members.sort(key=lambda item: (item.seq if item.seq is not None else -1, item.id))
        for before, after in itertools.pairwise(members):
            after_runs = by_job.get(after.id, [])
            if not after_runs:
                continue
            first_start = min(r.start for r in after_runs)
            if before.id in state.dead:
                report.violate(
                    "key order",
                    f"key {key}: job {after.id} ran although job {before.id} before it is dead",
                )
                continue
            done = acked_run.get(before.id)
            if done is None:
                report.violate(
                    "key order",
                    f"key {key}: job {after.id} ran but job {before.id} before it never finished",
                )
            elif first_start < done.stop(deaths):
                report.violate(
                    "key order",
                    f"key {key}: job {after.id} (seq {after.seq}) started "
                    f"{done.stop(deaths) - first_start:.3f}s before job {before.id} "
                    f"(seq {before.seq}) finished",
                )


# ------------------------------------------------------------------ messages


@dataclass
class Delivery:
    """One request a sink's receiver accepted (2xx), in arrival order."""

    message_id: str
    key: str | None
    payload: Any


@dataclass
class OutboxState:
    remaining: dict[str, dict[str, Any]]
    delivered: dict[str, dict[str, Any]]  # outbox_delivered (with attempts)
    dead: dict[str, dict[str, Any]]


def read_outbox_state(dsn: str, schema: str = "pgqueue") -> OutboxState:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:

        def rows(table: str) -> dict[str, dict[str, Any]]:
            return {
                row["message_id"]: row
                for row in conn.execute(
                    f"SELECT message_id::text AS message_id, attempts, key FROM {schema}.{table}"
                )
            }

        return OutboxState(rows("outbox"), rows("outbox_delivered"), rows("outbox_dead"))


def check_messages(
    scenario: str, produced: Produced, deliveries: Sequence[Delivery], state: OutboxState
) -> Report:
    """Classify every message and check the outbox invariants (see the module docstring)."""
    from tests.integration.test_outbox import key_order_violations

    got: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        got[delivery.message_id].append(delivery)
    committed = produced.ids("committed")
    unknown = produced.ids("unknown")
    surfaced = {
        m
        for m in unknown
        if m in got or m in state.remaining or m in state.delivered or m in state.dead
    }
    expected = committed | surfaced
    report = Report(
        scenario,
        "messages",
        total=len(expected),
        runs=len(deliveries),
        indeterminate=len(unknown),
        invocation=invocation(),
    )
    for message_id in sorted(set(got) - expected):
        report.unexpected += 1
        item = produced.items.get(message_id)
        name = "rolled back but delivered" if item is not None else "never published but delivered"
        report.violate(name, f"message {message_id} ({len(got[message_id])} deliveries)")
    for message_id in sorted(expected):
        item = produced.items[message_id]
        received = got.get(message_id, [])
        is_sent = message_id in state.delivered
        is_dead = message_id in state.dead
        if is_sent and received:
            report.completed += 1
        elif is_sent:
            report.lost += 1
            report.violate("sent but never received", f"message {message_id}")
        if is_dead:
            report.dead_lettered += 1
        if not is_sent and not is_dead:
            report.lost += 1
            where = state.remaining.get(message_id)
            report.violate(
                "lost",
                f"message {message_id}: {'still queued' if where else 'gone'}, "
                f"{len(received)} deliveries",
            )
        if len(received) > 1:
            report.duplicated += 1
            attempts = (state.delivered.get(message_id) or state.dead.get(message_id) or {}).get(
                "attempts", 0
            )
            if len(received) > attempts:
                report.violate(
                    "more deliveries than attempts",
                    f"message {message_id}: {len(received)} deliveries, {attempts} attempts",
                )
        for delivery in received:
            if delivery.payload != item.payload:
                report.violate(
                    "payload changed",
                    f"message {message_id}: got {delivery.payload!r}, sent {item.payload!r}",
                )
                break
    published: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for item in produced.items.values():
        if item.key is not None and item.id in expected:
            published[item.key].append((item.seq or 0, item.id))
    for key, members in published.items():
        order = [message_id for _, message_id in sorted(members)]
        wanted = set(order)
        arrived = [d.message_id for d in deliveries if d.key == key and d.message_id in wanted]
        dead = [m for m in order if m in state.dead]
        if dead:
            continue  # a dead message holds its key back: nothing after it to check
        for problem in key_order_violations(order, arrived):
            report.violate("key order", f"key {key}: {problem}")
    return report
