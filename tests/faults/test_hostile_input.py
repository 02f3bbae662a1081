"""Hostile input and secrets: fuzzed names, monstrous payloads, rows corrupted by hand, and a
canary password that must never show anywhere.

- Names: Hypothesis throws queue, task, topic and schema names at every public entry point
  that takes one (quotes, ``;``, ``--``, ``$$``, ``%s``, NUL, 49+ bytes, names equal in their
  first 63 bytes, reserved words, Unicode). The oracle is the documented rule (pgqueue/names.py:
  ``[A-Za-z0-9_.-]{1,48}``, schemas ``[a-z_][a-z0-9_]{0,29}``): a name outside it raises
  ``ValueError`` before any SQL (the caller's connection never left IDLE), a name inside it
  works (reserved words included: values are bound, identifiers quoted). The catalogue
  (pg_class, pg_namespace, pg_proc, pg_type, pg_trigger) is the same before and after.
- Payloads of 1, 50 and 300 MB, lone surrogates, NaN/Infinity, deep nesting: a clear error at
  ``enqueue`` and ``publish`` (single and bulk), before any SQL, without blowing up memory.
- Rows corrupted by hand in SQL (args not an object, an unknown task, wrong keys, wrong
  types, headers not an object) are dead-lettered with a clear error; the worker keeps going.
- A canary password (a role that really needs it: scram-sha-256 in pg_hba.conf) never shows in
  a real worker's or relay's stdout, stderr or log, in the views, error columns,
  ``pg_stat_activity`` or the server log: while working, with a wrong password, while the
  database is down, and against a closed port.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

import pgqueue
from pgqueue import App, JobSpec, OutboxMessage, PayloadTooLarge, Worker, db, migrate
from pgqueue.embedded import LocalPostgres
from pgqueue.queues import configure_queue, pause_queue
from tests.apps.outbox_app import LEDGER_DDL
from tests.faults.checker import Item, Produced, check_jobs, emit, read_job_state
from tests.faults.conftest import wait_until
from tests.faults.proxy import TcpProxy
from tests.faults.test_chaos import QUEUE, Cluster, drained, query
from tests.faults.test_relay_faults import Relays
from tests.servers import free_port

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

NAME_RULE = re.compile(r"[A-Za-z0-9_.\-]{1,48}")
SCHEMA_RULE = re.compile(r"[a-z_][a-z0-9_]{0,29}")
IDLE = TransactionStatus.IDLE
MB = 1024 * 1024


# ------------------------------------------------------------------ names


FRAGMENTS = [
    "'", '"', ";", "--", "$$", "$tag$", "%s", "%(queue)s", "%%", "{schema}", "{}", "\x00",
    "\\", "/*", "*/", " ", "\t", "\n", "`", ")", "(", ",", "DROP TABLE pgqueue.jobs",
    "pg_sleep(10)", "é", "ß", "😀", "\u202e", "\ufeff", "\uff41", "İ", "q", "Q", "_", "-", ".",
    "1", "select", "user", "table", "ORDER",
]  # fmt: skip
RESERVED = ["select", "user", "table", "order", "from", "where", "default", "null", "all"]
LONG_PREFIX = "n" * 63


def _names() -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=10).map("".join),
        st.text(max_size=80),
        st.integers(0, 80).map(lambda n: "q" * n),  # around the 48- and 30-byte limits
        # Names equal in their first 63 bytes (PostgreSQL cuts identifiers there).
        st.text(alphabet="abcxyz_", min_size=1, max_size=20).map(lambda s: LONG_PREFIX + s),
        st.sampled_from(RESERVED + [r.upper() for r in RESERVED]),
        st.integers(1, 60).map(lambda n: "é" * n),  # 2 bytes a character
    )


def catalogue(conn: psycopg.Connection[Any]) -> dict[str, int]:
    counts = {}
    for table in ("pg_class", "pg_namespace", "pg_proc", "pg_type", "pg_trigger", "pg_roles"):
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        counts[table] = int(row[0])
    for table in ("jobs", "queues", "outbox", "dead_jobs"):
        row = conn.execute(f"SELECT count(*) FROM pgqueue.{table}").fetchone()
        assert row is not None
        counts[f"pgqueue.{table}"] = int(row[0])
    conn.rollback()
    return counts


def _handler(job: pgqueue.Job) -> None:
    pass


def name_uses(dsn: str) -> dict[str, list[Callable[[Any, str], object]]]:
    """Every public entry point that takes a name, per kind of name."""
    return {
        "task": [
            lambda conn, name: pgqueue.enqueue(conn, name, {}),
            lambda conn, name: pgqueue.enqueue_many(conn, [(name, {})]),
            lambda conn, name: pgqueue.enqueue_many(conn, [JobSpec(task=name)]),
            lambda conn, name: App().task(name=name)(_handler),
        ],
        "queue": [
            lambda conn, name: pgqueue.enqueue(conn, "t", {}, queue=name),
            lambda conn, name: pgqueue.enqueue_many(conn, [("t", {})], queue=name),
            lambda conn, name: pgqueue.enqueue_many(conn, [JobSpec(task="t", queue=name)]),
            lambda conn, name: App().task(queue=name)(_handler).enqueue(conn),
            lambda conn, name: configure_queue(conn, name, max_depth=10),
            lambda conn, name: pause_queue(conn, name),
            lambda conn, name: Worker(App(), dsn, queues=[name]),
        ],
        "topic": [
            lambda conn, name: pgqueue.publish(conn, name, {}),
            lambda conn, name: pgqueue.publish_many(conn, [OutboxMessage(name, {})]),
        ],
        "schema": [
            lambda conn, name: pgqueue.enqueue(conn, "t", {}, schema=name),
            lambda conn, name: pgqueue.publish(conn, "t", {}, schema=name),
            lambda conn, name: configure_queue(conn, "q", schema=name),
            lambda conn, name: Worker(App(), dsn, schema=name),
            lambda conn, name: App(schema=name).task(_handler).enqueue(conn),
        ],
    }


def test_fuzzed_names_are_refused_before_any_sql_or_work_as_documented(dsn: str) -> None:
    uses = name_uses(dsn)
    conn = psycopg.connect(dsn, autocommit=False)
    before = catalogue(conn)
    refused: dict[str, int] = {kind: 0 for kind in uses}
    accepted: dict[str, int] = {kind: 0 for kind in uses}

    @settings(
        max_examples=int(os.environ.get("PGQUEUE_FUZZ_EXAMPLES", "300")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(name=_names(), kind=st.sampled_from(sorted(uses)))
    @example(name=LONG_PREFIX + "a", kind="queue")
    @example(name=LONG_PREFIX + "b", kind="schema")
    @example(name="x" * 49, kind="task")
    @example(name="x" * 48, kind="task")
    @example(name="a" * 31, kind="schema")
    @example(name="q\x00", kind="topic")
    @example(name="select", kind="queue")
    @example(name="user", kind="schema")
    @example(name="pgqueue; DROP SCHEMA pgqueue CASCADE; --", kind="schema")
    @example(name="$$", kind="topic")
    @example(name="%s", kind="task")
    def check(name: str, kind: str) -> None:
        assume(name != "")  # the empty name has its own test below
        valid = (SCHEMA_RULE if kind == "schema" else NAME_RULE).fullmatch(name) is not None
        if any(c in name for c in "'\";$%{}\\ \t\n\x00/*()`") or not name.isascii():
            assert not valid, f"the rule lets {name!r} through"
        for use in uses[kind]:
            conn.rollback()  # whatever an earlier (failing) example left behind
            if not valid:
                with pytest.raises(ValueError, match=f"invalid {kind} name"):
                    use(conn, name)
                # Nothing reached the server: not even a BEGIN.
                assert conn.info.transaction_status == IDLE, (kind, name)
                refused[kind] += 1
                continue
            if kind == "schema":
                # A schema that passes the rule is quoted wherever it goes into SQL; it does
                # not exist here, so only the rendering is checked (migration: the next test).
                rendered = db.queries(name)["claim_jobs"].text
                assert f'"{name}".claim_jobs(' in rendered or f"{name}.claim_jobs(" in rendered
                accepted[kind] += 1
                break
            use(conn, name)
            conn.rollback()
            accepted[kind] += 1

    try:
        check()
        after = catalogue(conn)
    finally:
        conn.close()
    assert after == before, "the fuzzed names changed the catalogue"
    assert all(refused.values()) and accepted["queue"] and accepted["task"], (refused, accepted)


@pytest.mark.parametrize(
    "call",
    [
        lambda conn: pgqueue.enqueue(conn, "t", {}, queue=""),
        lambda conn: pgqueue.enqueue_many(conn, [("t", {})], queue=""),
        lambda conn: pgqueue.enqueue_many(conn, [JobSpec(task="t", queue="")]),
    ],
    ids=["enqueue", "enqueue_many default", "JobSpec"],
)
def test_an_empty_queue_name_is_refused_not_replaced_by_default(
    conn: psycopg.Connection[Any], call: Callable[[Any], object]
) -> None:
    try:
        with pytest.raises(ValueError, match="invalid queue name"):
            call(conn)
        assert conn.info.transaction_status == IDLE
    finally:
        conn.rollback()


@given(a=st.from_regex(NAME_RULE, fullmatch=True), b=st.from_regex(NAME_RULE, fullmatch=True))
@settings(max_examples=300, deadline=None)
def test_distinct_queue_names_get_distinct_notify_channels_under_63_bytes(a: str, b: str) -> None:
    assume(a != b)
    channel_a, channel_b = db.channel("pgqueue", a), db.channel("pgqueue", b)
    assert channel_a != channel_b
    assert len(channel_a.encode()) <= 63 and re.fullmatch(r"pgqueue_[0-9a-f]{24}", channel_a)


def test_reserved_words_as_schema_and_queue_names_are_quoted_and_work(empty_dsn: str) -> None:
    """``user`` (a reserved word) as the schema, ``select`` as the queue: migrate, enqueue,
    run a worker, and nothing else in the catalogue changes but the new schema."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        namespaces = conn.execute("SELECT count(*) FROM pg_namespace").fetchone()
    migrate.upgrade(empty_dsn, schema="user")
    app = App(schema="user")
    seen: list[int] = []

    @app.task(queue="select", name="order")
    def order(job: pgqueue.Job, n: int) -> None:
        seen.append(n)

    with psycopg.connect(empty_dsn) as conn:
        order.enqueue(conn, n=7)
        pgqueue.publish(conn, "table", {"n": 1}, schema="user")
    worker = Worker(
        app, empty_dsn, settings=pgqueue.WorkerSettings(poll_seconds=0.1, lease_seconds=5)
    )
    import threading

    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: seen == [7], 20, "the job in schema 'user', queue 'select'")
    finally:
        worker.request_stop()
        thread.join(20)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        after = conn.execute("SELECT count(*) FROM pg_namespace").fetchone()
        topics = conn.execute('SELECT topic FROM "user".outbox').fetchall()
    assert after is not None and namespaces is not None and after[0] == namespaces[0] + 1
    assert topics == [("table",)]


@pytest.mark.parametrize("function", [migrate.upgrade, migrate.current])
def test_migrate_refuses_a_bad_schema_name_before_connecting(
    function: Callable[..., object],
) -> None:
    unreachable = f"postgresql://nobody@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(ValueError, match="invalid schema name"):
        function(unreachable, schema="pgqueue; DROP SCHEMA public CASCADE; --")


# ------------------------------------------------------------------ payloads


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("size_mb", [1, 50, 300])
def test_huge_payloads_are_refused_before_any_sql_without_blowing_up_memory(
    conn: psycopg.Connection[Any], size_mb: int
) -> None:
    blob = "x" * (size_mb * MB)
    peak_before = peak_rss_mb()
    calls: list[Callable[[], object]] = [
        lambda: pgqueue.enqueue(conn, "t", {"blob": blob}),
        lambda: pgqueue.enqueue_many(conn, [("t", {"n": 1}), ("t", {"blob": blob})]),
        lambda: pgqueue.publish(conn, "t", {"blob": blob}),
        lambda: pgqueue.publish_many(conn, [OutboxMessage("t", {"blob": blob})]),
        lambda: pgqueue.enqueue(conn, "t", {}, headers={"h": blob}),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(PayloadTooLarge, match=r"over the limit of 262144.*reference") as raised:
            call()
        assert conn.info.transaction_status == IDLE, "refused before any SQL"
        assert len(str(raised.value)) < 300, "the error does not echo the payload"
        assert time.monotonic() - started < 20
    # The payload is held once and encoded once per call: a few times its size at most.
    grown = peak_rss_mb() - peak_before
    assert grown < 4 * size_mb + 100, f"peak memory grew {grown:.0f} MB for {size_mb} MB"


def test_payload_the_database_refuses_is_payload_too_large_and_nothing_is_stored(
    dsn: str,
) -> None:
    """A client told a bigger limit still meets the table's constraint (incompressible data,
    so TOAST compression cannot squeeze it under 256 KiB)."""
    noise = os.urandom(MB).hex()
    with psycopg.connect(dsn) as conn:
        for call in (
            lambda: pgqueue.enqueue(conn, "t", {"blob": noise}, max_payload_bytes=10 * MB),
            lambda: pgqueue.publish(conn, "t", {"blob": noise}, max_payload_bytes=10 * MB),
        ):
            with pytest.raises(PayloadTooLarge, match="larger than the database allows"):
                call()
            conn.rollback()
    assert query(dsn, "SELECT (SELECT count(*) FROM pgqueue.jobs)"
                      " + (SELECT count(*) FROM pgqueue.outbox) AS n")[0]["n"] == 0  # fmt: skip


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


BAD_VALUES = [
    ({"a": "\ud800"}, ValueError, r"not valid Unicode|lone surrogate"),
    ({"a": ["ok", "x\udfff"]}, ValueError, r"not valid Unicode|lone surrogate"),
    ({"\udc80key": 1}, ValueError, r"not valid Unicode"),
    ({"a": float("nan")}, ValueError, r"\['a'\] is nan"),
    ({"a": {"b": float("inf")}}, ValueError, r"\['a'\]\['b'\] is inf"),
    ({"a": -float("inf")}, ValueError, r"is -inf"),
    ({"a": nested(1000)}, ValueError, r"nests deeper than 200"),
    ({"a": nested(100_000)}, ValueError, r"nests deeper than 200"),
    ({"a": "nul\x00"}, ValueError, r"NUL"),
    ({"a": b"bytes"}, TypeError, r"\['a'\] is a bytes"),
    ({"a": {1, 2}}, TypeError, r"\['a'\] is a set"),
]


@pytest.mark.parametrize(("value", "error", "message"), BAD_VALUES)
def test_values_json_cannot_hold_are_refused_at_enqueue_and_publish(
    conn: psycopg.Connection[Any], value: Any, error: type[Exception], message: str
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: pgqueue.enqueue(conn, "t", value),
        lambda: pgqueue.enqueue_many(conn, [("t", {}), ("t", value)]),
        lambda: pgqueue.publish(conn, "t", value),
        lambda: pgqueue.publish_many(conn, [OutboxMessage("t", {}), OutboxMessage("t", value)]),
    ]
    for call in calls:
        with pytest.raises(error, match=message) as raised:
            call()
        assert conn.info.transaction_status == IDLE, "refused before any SQL"
        # One line; a deep path is long ("args['a'][0][0]..."), never the whole value.
        assert "\n" not in str(raised.value) and len(str(raised.value)) < 1000


def test_deep_but_allowed_nesting_round_trips(conn: psycopg.Connection[Any]) -> None:
    job_id = pgqueue.enqueue(conn, "t", {"a": nested(190)})
    message_id = pgqueue.publish(conn, "t", nested(199))
    [(args,)] = conn.execute("SELECT args FROM pgqueue.jobs WHERE id = %s", [job_id])
    [(payload,)] = conn.execute(
        "SELECT payload FROM pgqueue.outbox WHERE message_id = %s", [message_id]
    )
    assert args == {"a": nested(190)} and payload == nested(199)


# ------------------------------------------------------------------ rows corrupted by hand


@pytest.fixture
def cluster(dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(dsn, tmp_path)
    yield started
    started.close()


CORRUPTIONS = {
    # name: (task, args, headers, reason, words of the error)
    "args an array": ("chaos", "[1, 2]", "{}", "bad_arguments", "args must be a JSON object"),
    "args a string": ("chaos", '"n=1"', "{}", "bad_arguments", "found str"),
    "args null": ("chaos", "null", "{}", "bad_arguments", "found NoneType"),
    "unknown task": ("no_such_task", "{}", "{}", "unknown_task", "no task named"),
    "unexpected key": ("chaos", '{"bogus": 1}', "{}", "bad_arguments", "unexpected argument"),
    "wrong type": ("chaos", '{"sleep": "soon"}', "{}", "max_attempts", "TypeError"),
    "headers an array": ("chaos", '{"n": 1}', "[1]", None, None),
}
# Valid jsonb that the worker's JSON decoder cannot decode.
# jsonb keeps numbers like 1e400 exactly and Python's decoder returns them as exact ints,
# so only nesting past the decoder's recursion limit is undecodable.
UNDECODABLE = {
    "nested 2000 deep": '{"n": ' + "[" * 2000 + "]" * 2000 + "}",
}


def insert_by_hand(dsn: str, rows: list[tuple[str, str, str]]) -> list[int]:
    """Rows written straight into pgqueue.jobs with SQL (task, args, headers), 2 attempts."""
    with psycopg.connect(dsn) as conn:
        return [
            conn.execute(
                "INSERT INTO pgqueue.jobs (queue, task, args, headers, max_attempts)"
                " VALUES (%s, %s, %s::jsonb, %s::jsonb, 2) RETURNING id",
                [QUEUE, task, args, headers],
            ).fetchone()[0]  # type: ignore[index]
            for task, args, headers in rows
        ]


def test_rows_corrupted_by_hand_are_dead_lettered_and_the_worker_keeps_going(
    cluster: Cluster, dsn: str
) -> None:
    produced = Produced()
    names = list(CORRUPTIONS)
    ids = insert_by_hand(dsn, [CORRUPTIONS[n][:3] for n in names])
    corrupted = dict(zip(ids, names, strict=True))
    for job_id, name in corrupted.items():
        produced.add([Item(job_id, "committed", expect="dead" if CORRUPTIONS[name][3] else "any")])
    good = enqueue_good(dsn, produced, 50)
    worker = cluster.start(concurrency=4)
    wait_until(lambda: drained(dsn) or not worker.is_alive(), 30, "every job to be settled")
    assert worker.is_alive(), worker.log()
    state = read_job_state(dsn)
    report = check_jobs("rows corrupted by hand", produced, cluster.runs(), state)
    emit(report)
    assert report.ok, report.explain()
    for job_id, name in corrupted.items():
        _, _, _, reason, words = CORRUPTIONS[name]
        if reason is None:
            assert job_id not in state.dead, (name, state.dead.get(job_id))
            continue
        dead = state.dead[job_id]
        assert dead["reason"] == reason, (name, dead)
        assert words in dead["last_error"], (name, dead["last_error"])
    assert report.completed == len(good) + 1  # the 50 good ones and the odd headers
    worker.send(signal.SIGTERM)
    assert worker.wait(20) == 0


def enqueue_good(dsn: str, produced: Produced, count: int) -> list[int]:
    with psycopg.connect(dsn) as conn:
        good = pgqueue.enqueue_many(conn, [("chaos", {"n": i}) for i in range(count)], queue=QUEUE)
    produced.add(Item(job_id, "committed") for job_id in good)
    return good


@pytest.mark.parametrize("name", list(UNDECODABLE))
def test_a_row_the_decoder_cannot_read_is_dead_lettered_and_the_worker_keeps_going(
    cluster: Cluster, dsn: str, name: str
) -> None:
    produced = Produced()
    [poison] = insert_by_hand(dsn, [("chaos", UNDECODABLE[name], "{}")])
    produced.add([Item(poison, "committed", expect="dead")])
    enqueue_good(dsn, produced, 20)
    worker = cluster.start(concurrency=4)
    wait_until(lambda: drained(dsn) or not worker.is_alive(), 30, "every job to be settled")
    assert worker.is_alive(), f"one undecodable row took the worker down:\n{worker.log()}"
    state = read_job_state(dsn)
    report = check_jobs(f"undecodable row: {name}", produced, cluster.runs(), state)
    emit(report)
    assert report.ok, report.explain()
    assert state.dead[poison]["reason"] == "bad_arguments"
    assert "decode" in state.dead[poison]["last_error"]


def test_an_outbox_payload_the_decoder_cannot_read_is_dead_lettered_and_the_relay_goes_on(
    dsn: str, tmp_path: Path
) -> None:
    query(dsn, LEDGER_DDL)
    poison = query(
        dsn,
        "SELECT message_id::text AS m FROM pgqueue.publish_messages(ARRAY['ledger.bad'],"
        " ARRAY[NULL]::text[], ARRAY[%s::jsonb], ARRAY['{}'::jsonb],"
        " ARRAY[0.0]::float8[])",
        (UNDECODABLE["nested 2000 deep"],),
    )[0]["m"]
    with psycopg.connect(dsn) as conn:
        good = pgqueue.publish_many(conn, [OutboxMessage("ledger.ok", {"n": i}) for i in range(5)])
    relays = Relays(dsn, tmp_path)
    try:
        relay = relays.start()
        wait_until(
            lambda: not query(dsn, "SELECT 1 FROM pgqueue.outbox") or not relay.is_alive(),
            20,
            "the outbox to be settled",
        )
        assert relay.is_alive(), f"one undecodable payload took the relay down:\n{relay.log()}"
        delivered = {r["m"] for r in query(dsn, "SELECT message_id::text AS m FROM outbox_ledger")}
        dead = {r["m"] for r in query(dsn, "SELECT message_id::text AS m FROM pgqueue.outbox_dead")}
        assert delivered == set(good) and dead == {poison}
    finally:
        relays.close()


def test_integers_beyond_64_bits_reach_the_handler_exactly(cluster: Cluster, dsn: str) -> None:
    big = 2**64 + 1
    with psycopg.connect(dsn) as conn:
        pgqueue.enqueue(conn, "chaos", {"n": big}, queue=QUEUE)
    worker = cluster.start(concurrency=1)
    wait_until(lambda: drained(dsn), 20, "the job to run")
    worker.send(signal.SIGTERM)
    assert worker.wait(20) == 0
    [run] = cluster.runs()
    assert run.n == big, f"the handler got {run.n!r}"


# ------------------------------------------------------------------ the canary password


CANARY = f"cAnArY-{uuid.uuid4().hex[:12]}-;'%@/"


def _forms(secret: str) -> set[str]:
    """Every way the secret could be written: as is, URL-quoted, and its distinctive core."""
    return {secret, quote(secret, safe=""), secret.split("-")[1]}


def _leaks(text: str, secret: str = CANARY) -> list[str]:
    return [form for form in _forms(secret) if form in text]


@pytest.fixture
def canary_role(dsn: str, pg_admin_dsn: str, pg_server: LocalPostgres | None) -> Iterator[str]:
    """A login role whose password is the canary; scram-sha-256 is required for it in
    pg_hba.conf when we run the server, so a wrong password is refused for real."""
    role = f"canary_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(
            psycopg.sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                psycopg.sql.Identifier(role), psycopg.sql.Literal(CANARY)
            )
        )
    hba = pg_server.data_dir / "pg_hba.conf" if pg_server is not None else None
    original = hba.read_text() if hba is not None else None
    try:
        if hba is not None and original is not None:
            hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{original}")
            query(pg_admin_dsn, "SELECT pg_reload_conf()")
            time.sleep(0.5)
        yield role
    finally:
        if hba is not None and original is not None:
            hba.write_text(original)
            query(pg_admin_dsn, "SELECT pg_reload_conf()")
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                [role],
            )
            time.sleep(0.2)
            admin.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(role)))


class Captured:
    """A `pgqueue` subprocess whose stdout and stderr go to files."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path, name: str) -> None:
        self.out_path, self.err_path = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pgqueue.cli.main", *args],
                env=env,
                cwd=Path(__file__).resolve().parents[2],
                stdout=out,
                stderr=err,
            )

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # Unreachable database: SIGKILL keeps this test short.
                self.popen.kill()
                self.popen.wait(10)


def test_the_canary_password_never_shows_in_output_logs_views_or_sessions(
    dsn: str,
    canary_role: str,
    pg_admin_dsn: str,
    pg_server: LocalPostgres | None,
    tmp_path: Path,
) -> None:
    parts = conninfo_to_dict(dsn)
    host, port, dbname = str(parts["host"]), int(parts["port"]), str(parts["dbname"])
    server_log_start = pg_server.log_file.stat().st_size if pg_server is not None else 0
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    outputs: list[Captured] = []
    base_env = {k: v for k, v in os.environ.items() if k not in ("PGQUEUE_DSN", "DATABASE_URL")}
    base_env.update(PYTHONUNBUFFERED="1", CHAOS_LEDGER_DIR=str(ledger))

    def url(password: str, at_port: int) -> str:
        return (
            f"postgresql://{canary_role}:{quote(password, safe='')}@127.0.0.1:{at_port}/{dbname}"
            "?sslmode=disable&gssencmode=disable"
        )

    def start(name: str, command: list[str], dsn_value: str) -> Captured:
        env = {**base_env, "PGQUEUE_DSN": dsn_value}
        process = Captured([*command, "--dsn", dsn_value], env, tmp_path, name)
        outputs.append(process)
        return process

    worker_args = [
        "worker", "--app", "tests.apps.chaos_app:app", "--queue", QUEUE,
        "--lease-seconds", "2", "--poll-seconds", "0.2", "--shutdown-grace", "2",
    ]  # fmt: skip
    with TcpProxy(host, port) as proxy:
        # 1. The right password, through a proxy that will play "database down".
        worker = start("worker", worker_args, url(CANARY, proxy.port))
        relay = start(
            "relay",
            ["relay", "--app", "tests.apps.outbox_app:app", "--lease-seconds", "2",
             "--poll-seconds", "0.2"],
            make_conninfo(url(CANARY, proxy.port)),
        )  # fmt: skip
        for process, ready in ((worker, "started: queues="), (relay, "started: sinks=")):
            wait_until(lambda p=process, r=ready: r in p.output(), 20, f"{ready} in the log")
        with psycopg.connect(dsn) as conn:
            pgqueue.enqueue_many(conn, [("chaos", {"n": i}) for i in range(20)], queue=QUEUE)
            pgqueue.enqueue(conn, "chaos", {"mode": "raise"}, queue=QUEUE, max_attempts=2)
            pgqueue.enqueue(conn, "chaos", {"n": 1, "db_clock": True}, queue=QUEUE)
            pgqueue.publish(conn, "nowhere.at.all", {"n": 1})  # no route: dead-lettered
        wait_until(lambda: drained(dsn), 30, "the canary worker to work the jobs off")
        sessions = query(
            dsn,
            "SELECT application_name, query, backend_type FROM pg_stat_activity WHERE usename = %s",
            [canary_role],
        )
        assert any(s["application_name"].startswith("pgqueue-worker") for s in sessions)
        # 2. The database "goes down" for them: sessions reset, reconnects refused.
        proxy.drop()
        wait_until(lambda: "cannot connect" in worker.output(), 15, "the worker to notice")
        time.sleep(2)
        proxy.forward()
        wait_until(
            lambda: query(dsn, "SELECT 1 FROM pg_stat_activity WHERE usename = %s"
                               " AND application_name LIKE 'pgqueue-worker@%%'", [canary_role]),
            30,
            "the worker to reconnect",
        )  # fmt: skip
        worker.stop()
        relay.stop()

    # 3. A wrong password (refused for real when we run the server), 4. a closed port.
    wrong = f"wRoNg-{uuid.uuid4().hex[:12]}-;'%@/"
    refused = start("wrong-password", worker_args, url(wrong, port))
    closed = start(
        "closed-port", worker_args, make_conninfo(url(CANARY, free_port()), connect_timeout=2)
    )
    cli = [
        start("cli-status", ["status"], url(CANARY, free_port())),
        start("cli-enqueue", ["enqueue", "chaos", "--queue", QUEUE], url(wrong, port)),
    ]
    wait_until(
        lambda: (
            "cannot connect" in closed.output()
            and ("cannot connect" in refused.output() or pg_server is None)
        ),
        20,
        "the misconfigured workers to log their failures",
    )
    time.sleep(1)
    for process in (refused, closed, *cli):
        process.stop(timeout=2)
    if pg_server is not None:
        # The server really checked the password.
        assert "refused the credentials" in refused.output(), refused.output()
        assert cli[1].popen.returncode == 1

    # Everywhere the password could have gone:
    views = {
        view: query(dsn, f"SELECT * FROM pgqueue.{view}")
        for view in ("queue_stats", "running_jobs", "dead_letters", "workers", "blocked_keys",
                     "outbox_backlog", "health")
    }  # fmt: skip
    columns = query(
        dsn,
        "SELECT last_error FROM pgqueue.dead_jobs UNION ALL SELECT last_error FROM pgqueue.jobs"
        " UNION ALL SELECT last_error FROM pgqueue.outbox_dead"
        " UNION ALL SELECT last_error FROM pgqueue.outbox"
        " UNION ALL SELECT host || ' ' || array_to_string(queues, ',') FROM pgqueue.processes",
    )
    assert any(c["last_error"] and "poison job" in c["last_error"] for c in columns)
    server_log = ""
    if pg_server is not None:
        with open(pg_server.log_file, errors="replace") as log:
            log.seek(server_log_start)
            server_log = log.read()
    places = {
        **{f"{p.out_path.stem} stdout+stderr": p.output() for p in outputs},
        "pg_stat_activity": repr(sessions),
        "views": repr(views),
        "error columns": repr(columns),
        "server log": server_log,
    }
    leaks = {place: _leaks(text) + _leaks(text, wrong) for place, text in places.items()}
    assert not any(leaks.values()), {p: f for p, f in leaks.items() if f}
    assert all("Traceback" not in p.output() for p in outputs), [p.output() for p in outputs]


def test_a_wrong_password_is_a_configuration_error_not_an_outage(
    dsn: str, canary_role: str, pg_server: LocalPostgres | None
) -> None:
    if pg_server is None:
        pytest.skip("needs pg_hba.conf of a server we run, to require the password")
    wrong = make_conninfo(dsn, user=canary_role, password="not-the-canary")
    with pytest.raises(pgqueue.ConfigurationError, match="refused the credentials"):
        db.connect(wrong, "test")
