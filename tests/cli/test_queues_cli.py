"""`pgqueue queues list|pause|resume|set` as users run it: real processes, real database."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

import pgqueue
from pgqueue.queues import list_queues
from tests.cli.test_cli import pgqueue as run


def settings(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        return {q.name: q for q in list_queues(conn)}


def ok(*args: str) -> Any:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return result


def test_set_pause_resume_and_list_round_trip(dsn: str) -> None:
    assert json.loads(ok("queues", "list", "--json", "--dsn", dsn).stdout) == []
    assert "no queues yet" in ok("queues", "list", "--dsn", dsn).stdout

    created = ok(
        "queues", "set", "billing", "--concurrency", "3", "--rate", "50", "--per", "2",
        "--max-depth", "1000", "--dsn", dsn,
    )  # fmt: skip
    assert created.stdout.strip() == (
        "set billing: running, concurrency 3, rate 50/2s, max depth 1000"
    )
    assert "had no settings yet" in created.stderr
    billing = settings(dsn)["billing"]
    assert (billing.concurrency_limit, billing.rate_limit, billing.rate_interval_seconds) == (
        3,
        50,
        2.0,
    )
    assert billing.max_depth == 1000 and not billing.is_paused

    paused = json.loads(ok("queues", "pause", "billing", "--json", "--dsn", dsn).stdout)
    assert paused["paused"] is True and paused["created"] is False
    assert paused["concurrency_limit"] == 3, "pausing keeps the limits"
    assert settings(dsn)["billing"].is_paused

    # Only what is named changes; --rate without --per means per second.
    ok("queues", "set", "billing", "--rate", "7", "--dsn", dsn)
    ok("queues", "set", "email", "--max-depth", "5", "--dsn", dsn)
    listed = json.loads(ok("queues", "list", "--json", "--dsn", dsn).stdout)
    assert listed == [
        {
            "name": "billing",
            "paused": True,
            "concurrency_limit": 3,
            "rate_limit": 7,
            "rate_interval_seconds": 1.0,
            "rate": "7/1s",
            "max_depth": 1000,
        },
        {
            "name": "email",
            "paused": False,
            "concurrency_limit": None,
            "rate_limit": None,
            "rate_interval_seconds": None,
            "rate": None,
            "max_depth": 5,
        },
    ]
    table = ok("queues", "list", "--dsn", dsn).stdout
    billing_line = next(line for line in table.splitlines() if "billing" in line)
    assert billing_line.split() == ["│", "billing", "│", "yes", "│", "3", "│", "7/1s", "│",
                                    "1000", "│"]  # fmt: skip
    email_line = next(line for line in table.splitlines() if "email" in line)
    assert "-" in email_line.split() and "5" in email_line.split()

    resumed = ok("queues", "resume", "billing", "--dsn", dsn)
    assert resumed.stdout.startswith("resumed billing: running,")
    removed = json.loads(
        ok(
            "queues", "set", "billing", "--no-concurrency-limit", "--no-rate-limit",
            "--no-max-depth", "--json", "--dsn", dsn,
        ).stdout
    )  # fmt: skip
    assert removed["concurrency_limit"] is None and removed["rate"] is None
    assert removed["max_depth"] is None and removed["paused"] is False


def test_settings_set_from_the_cli_are_what_enqueue_and_workers_obey(dsn: str) -> None:
    ok("queues", "set", "small", "--max-depth", "2", "--dsn", dsn)
    with psycopg.connect(dsn) as conn:
        pgqueue.enqueue_many(conn, [("t", {}), ("t", {})], queue="small")
        with pytest.raises(pgqueue.QueueFull):
            pgqueue.enqueue(conn, "t", queue="small")
    # A paused queue: the claim function hands out nothing until it is resumed.
    ok("queues", "pause", "small", "--dsn", dsn)
    claim = (
        "SELECT count(*) FROM pgqueue.claim_jobs('small', 10, gen_random_uuid(), 30, '{}', '{}', 3)"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(claim).fetchone() == (0,)
    ok("queues", "resume", "small", "--dsn", dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(claim).fetchone() == (2,)


def test_pgqueue_dsn_and_schema_options(dsn: str) -> None:
    result = run("queues", "pause", "reports", env={"PGQUEUE_DSN": dsn})
    assert result.returncode == 0, result.stderr
    assert settings(dsn)["reports"].is_paused
    wrong_schema = run("queues", "list", "--dsn", dsn, "--schema", "elsewhere")
    assert wrong_schema.returncode == 3 and "pgqueue migrate" in wrong_schema.stderr
    assert "Traceback" not in wrong_schema.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["set", "q"], 2, "nothing to change"),
        (["set", "q", "--concurrency", "2", "--no-concurrency-limit"], 2, "not both"),
        (["set", "q", "--rate", "5", "--no-rate-limit"], 2, "not both"),
        (["set", "q", "--max-depth", "5", "--no-max-depth"], 2, "not both"),
        (["set", "q", "--per", "2"], 2, "--per needs --rate"),
        (["set", "q", "--rate", "5", "--per", "0"], 2, "positive"),
        (["set", "q", "--concurrency", "0"], 2, "--concurrency"),
        (["pause"], 2, "Missing argument 'NAME'"),
        (["pause", "bad queue"], 1, "invalid queue name 'bad queue'"),
    ],
)
def test_bad_arguments_are_one_clear_error_and_change_nothing(
    dsn: str, args: list[str], code: int, message: str
) -> None:
    result = run("queues", *args, "--dsn", dsn)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert settings(dsn) == {}


def test_unreachable_database_is_one_line(pg_admin_dsn: str) -> None:
    result = run("queues", "list", "--dsn", "postgresql://nobody:secret@127.0.0.1:1/none")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0
    assert "secret" not in result.stderr


def test_status_shows_each_queues_limits(dsn: str) -> None:
    ok("queues", "set", "billing", "--concurrency", "3", "--rate", "50", "--per", "2", "--dsn", dsn)
    ok("queues", "set", "email", "--max-depth", "5", "--dsn", dsn)
    ok("queues", "pause", "email", "--dsn", dsn)
    lines = ok("status", "--dsn", dsn).stdout.splitlines()
    assert "limits of billing: concurrency 3, rate 50/2s" in lines
    assert "limits of email: max depth 5" in lines
    (email,) = [line for line in lines if line.strip().startswith("email ")]
    assert email.split()[-1] == "yes", "paused"
    assert all(len(line) <= 80 for line in lines), "fits an 80-column terminal"
    rows = {r["queue"]: r for r in json.loads(ok("status", "--json", "--dsn", dsn).stdout)}
    assert rows["billing"]["concurrency_limit"] == 3 and rows["billing"]["rate_limit"] == 50
    assert rows["billing"]["rate_interval_seconds"] == 2.0 and rows["billing"]["max_depth"] is None
    assert rows["email"]["max_depth"] == 5 and rows["email"]["is_paused"] is True
    assert rows["email"]["counts_estimated"] is False
