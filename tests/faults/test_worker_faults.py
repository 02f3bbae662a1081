"""Real worker processes failing for real: raising, exiting, SIGKILL, SIGSTOP, SIGTERM.

Every test runs `pgqueue worker` subprocesses (tests/apps/fault_app.py) against a fresh
database. The handler writes 'start'/'end' rows to a ledger on its own connection, so the
tests compare what handlers really did with what the queue says happened. Leases are 2 s
unless a test needs otherwise; every wait polls the database (or a log) against a deadline.
"""

from __future__ import annotations

import re
import signal
import time
from datetime import timedelta

import pytest

from tests.faults.conftest import Ledger, Workers, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

# What the worker logs when it drops an outcome because another worker holds the job.
DISCARDED = re.compile(r"lease lost, result discarded|not written, the lease was lost")
LEASE_LOST = re.compile(r"lease (was )?lost")


def pids(events: list[dict]) -> list[int]:
    return [e["worker_pid"] for e in events]


def test_always_failing_job_is_dead_lettered_after_max_attempts(
    workers: Workers, ledger: Ledger
) -> None:
    job_id = ledger.enqueue(max_attempts=3, always_raise=True)
    worker = workers.start()

    dead = wait_until(lambda: ledger.dead(job_id), 20, "the job in dead_jobs")

    assert ledger.job(job_id) is None
    assert dead["reason"] == "max_attempts"
    assert (dead["attempts"], dead["max_attempts"]) == (3, 3)
    assert dead["last_error"].startswith("RuntimeError: handler always fails (attempt 3)")
    assert "Traceback (most recent call last)" in dead["last_error"]
    assert "fault_app.py" in dead["last_error"]
    assert [e["attempt"] for e in ledger.events(job_id, "start")] == [1, 2, 3]
    assert ledger.events(job_id, "end") == []
    assert worker.is_alive(), "a failing handler must not take the worker down"


def test_job_that_kills_its_worker_is_dead_lettered_once_out_of_attempts(
    workers: Workers, ledger: Ledger
) -> None:
    job_id = ledger.enqueue(max_attempts=2, exit_process=True)
    current = [workers.start()]
    exit_codes: list[int | None] = []

    def restart_dead_worker_then_look() -> object:
        # Like a supervisor: a worker the job killed is replaced; the replacement rescues
        # the expired lease, runs the job again (and dies), until attempts are used up.
        if not current[0].is_alive():
            exit_codes.append(current[0].popen.returncode)
            current[0] = workers.start()
        return ledger.dead(job_id)

    dead = wait_until(restart_dead_worker_then_look, 30, "the job in dead_jobs")

    assert ledger.job(job_id) is None
    assert dead["reason"] == "lease_expired"
    assert (dead["attempts"], dead["max_attempts"]) == (2, 2)
    assert "lease expired" in dead["last_error"]
    starts = ledger.events(job_id, "start")
    assert [e["attempt"] for e in starts] == [1, 2]
    assert len(set(pids(starts))) == 2, "each attempt killed its own worker process"
    assert ledger.events(job_id, "end") == []
    assert exit_codes == [1, 1]
    assert current[0].is_alive(), "the worker that dead-lettered the job keeps running"


def test_sigkilled_worker_job_is_completed_once_by_another_after_lease_expiry(
    workers: Workers, ledger: Ledger
) -> None:
    first = workers.start()
    job_id = ledger.enqueue(sleep_seconds=2.0)
    wait_until(lambda: ledger.events(job_id, "start"), 10, "the first worker to start the job")

    first.send(signal.SIGKILL)
    assert first.wait(5) == -signal.SIGKILL
    orphaned = ledger.job(job_id)
    assert orphaned is not None and orphaned["state"] == "running"
    second = workers.start()

    wait_until(lambda: ledger.job(job_id) is None, 20, "the job to be acknowledged")

    starts = ledger.events(job_id, "start")
    ends = ledger.events(job_id, "end")
    assert pids(starts) == [first.pid, second.pid]
    assert [e["attempt"] for e in starts] == [1, 2]
    assert starts[1]["at"] >= orphaned["lease_expires_at"], "re-run only after the lease expired"
    assert pids(ends) == [second.pid], "exactly one completed run, by the second worker"
    assert ledger.dead(job_id) is None
    assert not LEASE_LOST.search(second.log())


def test_stopped_worker_resumed_after_losing_its_lease_cannot_ack_or_heartbeat(
    workers: Workers, ledger: Ledger
) -> None:
    zombie = workers.start()
    job_id = ledger.enqueue(sleep_seconds=3.0)
    wait_until(lambda: ledger.events(job_id, "start"), 10, "the first worker to start the job")
    zombie.send(signal.SIGSTOP)
    rescuer = workers.start()

    def started_by_rescuer() -> bool:
        return rescuer.pid in pids(ledger.events(job_id, "start"))

    wait_until(started_by_rescuer, 20, "the second worker to rescue and start the job")
    held = ledger.job(job_id)
    assert held is not None and held["state"] == "running" and held["attempts"] == 2

    zombie.send(signal.SIGCONT)
    # Its handler's sleep is long over: it finishes at once and tries to ack; its heartbeat
    # thread wakes up and tries to renew. Both are fenced by the old lease token.
    wait_until(
        lambda: zombie.pid in pids(ledger.events(job_id, "end")) and DISCARDED.search(zombie.log()),
        10,
        "the resumed worker to finish its handler and have its outcome discarded",
    )
    still_held = ledger.job(job_id)
    assert still_held is not None, "the zombie's ack deleted a job another worker holds"
    assert still_held["state"] == "running"
    assert still_held["lease_token"] == held["lease_token"]
    assert still_held["worker_id"] == held["worker_id"]
    assert rescuer.pid not in pids(ledger.events(job_id, "end")), "test timing: rescuer too fast"

    wait_until(lambda: ledger.job(job_id) is None, 15, "the second worker to ack the job")

    assert pids(ledger.events(job_id, "start")) == [zombie.pid, rescuer.pid]
    assert sorted(pids(ledger.events(job_id, "end"))) == sorted([zombie.pid, rescuer.pid])
    assert ledger.dead_count() == 0
    assert LEASE_LOST.search(zombie.log())
    assert not LEASE_LOST.search(rescuer.log()), "the rescuer's own ack must go through"
    assert zombie.is_alive() and rescuer.is_alive()


def test_sigterm_lets_in_flight_jobs_finish_within_grace_and_stops_claiming(
    workers: Workers, ledger: Ledger
) -> None:
    worker = workers.start(concurrency=8, shutdown_grace=10)
    # Claimed in one batch, so they finish (and are acked) within moments of each other.
    job_ids = ledger.enqueue_together(6, sleep_seconds=1.5)
    wait_until(lambda: all(ledger.events(j, "start") for j in job_ids), 10, "all jobs to start")

    signalled_at = ledger.now()
    started = time.monotonic()
    worker.send(signal.SIGTERM)
    wait_until(lambda: "stopping claims" in worker.log(), 5, "the worker to log its shutdown")
    late_id = ledger.enqueue(sleep_seconds=0)
    assert worker.wait(8) == 0
    elapsed = time.monotonic() - started

    assert elapsed < 8
    for job_id in job_ids:
        assert ledger.job(job_id) is None, "a job that finished within the grace is acked"
        (end,) = ledger.events(job_id, "end")
        assert end["at"] > signalled_at, "the job was still running when SIGTERM came"
    late = ledger.job(late_id)
    assert late is not None and late["state"] == "available" and late["attempts"] == 0
    assert ledger.events(late_id) == [], "no job is claimed after SIGTERM"
    assert ledger.dead_count() == 0


def test_sigterm_releases_unfinished_job_at_once_when_grace_runs_out(
    workers: Workers, ledger: Ledger
) -> None:
    worker = workers.start(concurrency=2, shutdown_grace=2, lease_seconds=30)
    short_id = ledger.enqueue(sleep_seconds=0.5)
    long_id = ledger.enqueue(sleep_seconds=25)
    wait_until(
        lambda: ledger.events(short_id, "start") and ledger.events(long_id, "start"),
        10,
        "both jobs to start",
    )
    held = ledger.job(long_id)
    assert held is not None and held["state"] == "running" and held["attempts"] == 1

    started = time.monotonic()
    worker.send(signal.SIGTERM)

    def released() -> dict | None:
        row = ledger.job(long_id)
        return row if row is not None and row["state"] == "available" else None

    row = wait_until(released, 8, "the unfinished job to be released")
    released_after = time.monotonic() - started

    assert 1.5 < released_after < 5, "the long job gets the grace period, then no more"
    assert row["lease_token"] is None and row["worker_id"] is None
    assert row["attempts"] == 0, "a released job gets its attempt back"
    assert ledger.now() < held["lease_expires_at"] - timedelta(seconds=20), (
        "released well before its lease would have expired"
    )
    assert ledger.job(short_id) is None and len(ledger.events(short_id, "end")) == 1
    assert f"releasing job {long_id}" in worker.log()
    # Having given the job back, the worker exits now: it does not wait for the handler
    # (whose job another worker may already be running).
    assert worker.wait(3) == 0
    after_exit = ledger.job(long_id)
    assert after_exit is not None and after_exit["state"] == "available"
    assert after_exit["attempts"] == 0 and after_exit["lease_token"] is None
    assert ledger.events(long_id, "end") == []
    assert ledger.dead_count() == 0


def test_second_sigterm_exits_immediately(workers: Workers, ledger: Ledger) -> None:
    worker = workers.start(shutdown_grace=60, lease_seconds=30)
    job_id = ledger.enqueue(sleep_seconds=30)
    wait_until(lambda: ledger.events(job_id, "start"), 10, "the job to start")

    worker.send(signal.SIGTERM)
    wait_until(lambda: "stopping claims" in worker.log(), 5, "the first SIGTERM to be handled")
    started = time.monotonic()
    worker.send(signal.SIGTERM)
    code = worker.wait(5)
    elapsed = time.monotonic() - started

    assert elapsed < 2, f"second SIGTERM took {elapsed:.1f}s to end the process"
    assert code == 143
    assert ledger.events(job_id, "end") == []
    job = ledger.job(job_id)
    assert job is not None and job["state"] == "running", "left for rescue when the lease expires"
