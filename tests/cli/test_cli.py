"""The pgqueue command as users run it: real processes, real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from pgqueue import App, Job

CANARY = "canary-Pa55word-7f3a"


def pgqueue(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    environment = {k: v for k, v in os.environ.items() if k not in ("PGQUEUE_DSN", "DATABASE_URL")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pgqueue.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def test_migrate_enqueue_status_roundtrip(empty_dsn: str) -> None:
    first = pgqueue("migrate", "--dsn", empty_dsn)
    assert first.returncode == 0, first.stderr
    assert "upgraded from nothing" in first.stdout
    again = pgqueue("migrate", env={"PGQUEUE_DSN": empty_dsn})
    assert again.returncode == 0 and "already at" in again.stdout
    current = pgqueue("migrate", "current", "--json", env={"DATABASE_URL": empty_dsn})
    assert json.loads(current.stdout)["current"] == json.loads(current.stdout)["head"]
    queued = pgqueue(
        "enqueue",
        "send_receipt",
        "--args",
        '{"order_id": 1}',
        "-q",
        "email",
        "--dsn",
        empty_dsn,
        "--json",
    )
    assert queued.returncode == 0, queued.stderr
    job_id = json.loads(queued.stdout)["id"]
    status = pgqueue("status", "--json", "--dsn", empty_dsn)
    rows = json.loads(status.stdout)
    assert rows[0]["queue"] == "email" and rows[0]["ready"] == 1
    table = pgqueue("status", "--dsn", empty_dsn)
    assert "email" in table.stdout
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute(
            "SELECT task FROM pgqueue.jobs WHERE id = %s", (job_id,)
        ).fetchone() == ("send_receipt",)


def test_sql_flag_prints_the_migration(empty_dsn: str) -> None:
    result = pgqueue("migrate", "--sql")
    assert result.returncode == 0 and "CREATE TABLE pgqueue.jobs" in result.stdout


def test_unmigrated_database_says_what_to_run(empty_dsn: str) -> None:
    result = pgqueue("status", "--dsn", empty_dsn)
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0
    assert "run `pgqueue migrate`" in result.stderr and "Traceback" not in result.stderr


def test_wrong_dsn_is_one_line_without_the_password(pg_admin_dsn: str) -> None:
    bad = f"postgresql://nobody:{CANARY}@127.0.0.1:1/nowhere"
    for args in (
        ("status", "--dsn", bad),
        ("migrate", "--dsn", bad),
        ("enqueue", "t", "--dsn", bad),
    ):
        result = pgqueue(*args)
        assert result.returncode == 1, result
        assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0
        assert CANARY not in result.stderr + result.stdout


def test_missing_dsn_and_bad_arguments(empty_dsn: str) -> None:
    result = pgqueue("status")
    assert result.returncode == 1 and "PGQUEUE_DSN" in result.stderr
    result = pgqueue("enqueue", "t", "--args", "{nope", "--dsn", empty_dsn)
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    result = pgqueue("worker", "--app", "no_such_module:app", "--dsn", empty_dsn)
    assert result.returncode == 2 and "cannot import" in result.stderr
    migrated = pgqueue("migrate", "--dsn", empty_dsn)
    assert migrated.returncode == 0
    result = pgqueue("enqueue", "bad task", "--dsn", empty_dsn)
    assert result.returncode == 1 and "invalid task name" in result.stderr


OPTIONS_APP = App()


@OPTIONS_APP.task(queue="options")
def noop(job: Job) -> None: ...


def test_worker_options_reach_the_worker_settings(
    empty_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, with the worker's run replaced: what each flag sets, nothing started."""
    import logging

    from pgqueue.cli import main as cli_main
    from typer.testing import CliRunner

    from pgqueue.worker import Worker

    seen: list[Any] = []

    def fake_run(self: Worker, **_: Any) -> int:
        seen.append(self.settings)
        return 0

    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(Worker, "run", fake_run)
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    monkeypatch.setattr(cli_main, "_setup_logging", lambda *args: None)
    runner = CliRunner()
    base = ["worker", "--app", "tests.cli.test_cli:OPTIONS_APP", "--dsn", empty_dsn]
    chosen_flags = ["--durable-claims", "--no-listen", "--concurrency", "7"]
    for extra in ([], [*chosen_flags, "--event-loop", "asyncio"]):
        result = runner.invoke(cli_main.app, [*base, *extra])
        assert result.exit_code == 0, result.output
    default, chosen = seen
    assert (default.durable_claims, default.listen, default.concurrency) == (False, True, 10)
    assert (chosen.durable_claims, chosen.listen, chosen.concurrency) == (True, False, 7)
    assert (default.event_loop, chosen.event_loop) == ("auto", "asyncio")
    bad = runner.invoke(cli_main.app, [*base, "--event-loop", "trio"])
    assert bad.exit_code != 0 and "event_loop must be one of" in bad.output
