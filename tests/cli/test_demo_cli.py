"""`pgqueue demo`, the README's main job, as users run it: against a database given to it."""

from __future__ import annotations

import re

import psycopg

from tests.cli.test_cli import pgqueue


def test_the_demo_tells_its_whole_story_on_the_given_database(empty_dsn: str) -> None:
    done = pgqueue("demo", "--orders", "60", "--dsn", empty_dsn, timeout=180)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())  # the console wraps long lines
    assert "No DSN given" not in said  # it used the database it was given
    receipts = re.search(r"Receipts sent: (\d+) of (\d+) orders", said)
    assert receipts is not None, said
    assert receipts.group(1) == receipts.group(2) == "60"
    assert "Dead letters: 1." in said
    events = re.search(r"order\.created events delivered by the relay: (\d+)", said)
    assert events is not None and int(events.group(1)) == 60, said
    assert "per-customer order kept: yes" in said
    assert "dead letter: job" in said and "refund_card" in said
    with psycopg.connect(empty_dsn) as conn:
        sent = conn.execute("SELECT count(*) FROM demo_orders WHERE receipt_sent").fetchone()
        left = conn.execute("SELECT count(*) FROM pgqueue.jobs").fetchone()
        dead = conn.execute("SELECT task FROM pgqueue.dead_jobs").fetchall()
    assert sent == (60,)
    assert left == (0,)
    assert dead == [("refund_card",)]
