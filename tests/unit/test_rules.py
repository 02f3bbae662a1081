"""Pure rules: name allow-lists, payload encoding, backoff, outcome decisions."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

import pgqueue
from pgqueue import names
from pgqueue.errors import Cancel, NonRetryable, PayloadTooLarge, Retry, Snooze
from pgqueue.outcome import MAX_ERROR_CHARS, decide, format_error
from pgqueue.payload import Undecodable, encode, loads_many
from pgqueue.retry import RetryPolicy


def test_public_api_is_pinned() -> None:
    assert sorted(pgqueue.__all__) == sorted(
        [
            "App", "Cancel", "ConfigurationError", "DatabaseError", "DuplicateJob", "Job",
            "JobControl", "JobSpec", "JobTimeout", "LeaseLost", "NonRetryable", "NotFound",
            "OutboxMessage", "PayloadTooLarge", "PgQueueError", "QueueFull", "Relay",
            "RelaySettings", "Retry", "RetryPolicy", "Route", "SchemaNotReady", "Snooze",
            "Task", "Worker", "WorkerSettings", "__version__", "configure_queue", "enqueue",
            "enqueue_async", "enqueue_many", "enqueue_many_async", "list_queues", "pause_queue",
            "publish", "publish_async", "publish_many", "publish_many_async", "resume_queue",
        ]
    )  # fmt: skip


@pytest.mark.parametrize("value", ["email", "a", "x" * 48, "billing.v2", "low-prio_1"])
def test_valid_names_pass(value: str) -> None:
    assert names.queue_name(value) == value
    assert names.task_name(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "x" * 49, "a b", "q;drop", "q'", 'q"', "$$", "%s", "q\x00", "é", "tab\t"],
)
def test_invalid_names_raise_with_the_rule(value: str) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        names.queue_name(value)


def test_schema_names_are_stricter() -> None:
    assert names.schema_name("pgqueue_2") == "pgqueue_2"
    for bad in ("Pgqueue", "1abc", "a-b", "x" * 31, "pg queue"):
        with pytest.raises(ValueError, match="lowercase"):
            names.schema_name(bad)


def test_encode_names_the_path_of_a_bad_value() -> None:
    with pytest.raises(TypeError, match=r"args\['items'\]\[1\]\['when'\] is a object"):
        encode({"items": [1, {"when": object()}]})


def test_encode_rejects_nan_and_surrogates_and_nul() -> None:
    with pytest.raises(ValueError, match="nan"):
        encode({"x": math.nan})
    with pytest.raises(ValueError, match="Unicode"):
        encode({"x": "\ud800"})
    with pytest.raises(ValueError, match="NUL"):
        encode({"x": "a\x00b"})


def test_encode_rejects_deep_nesting() -> None:
    value: object = 1
    for _ in range(5000):
        value = [value]
    with pytest.raises(ValueError, match="deeper"):
        encode({"x": value})


def test_payload_limit_is_checked_before_sql() -> None:
    with pytest.raises(PayloadTooLarge, match=r"over the limit of 1024.*reference"):
        encode({"blob": "x" * 2000}, max_bytes=1024)
    assert encode({"blob": "x" * 10}, max_bytes=1024) == '{"blob":"xxxxxxxxxx"}'


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(base_seconds=1, multiplier=2, max_seconds=10, jitter=False)
    assert [policy.delay_seconds(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.delay_seconds(10_000) == 10


def test_full_jitter_stays_within_the_ceiling() -> None:
    policy = RetryPolicy(base_seconds=1, multiplier=2, max_seconds=100)
    rng = random.Random(7)
    draws = [policy.delay_seconds(4, rng) for _ in range(2000)]
    assert 0 <= min(draws) < 0.5 and 7.5 < max(draws) <= 8


def test_decide_maps_each_signal() -> None:
    policy = RetryPolicy(base_seconds=3, jitter=False)
    assert decide(None, attempt=1, max_attempts=3, policy=policy).kind == "complete"
    retry = decide(RuntimeError("x"), attempt=1, max_attempts=3, policy=policy)
    assert (retry.kind, retry.delay_seconds) == ("retry", 3)
    assert "RuntimeError: x" in (retry.error or "")
    last = decide(RuntimeError("x"), attempt=3, max_attempts=3, policy=policy)
    assert (last.kind, last.reason) == ("fail", "max_attempts")
    assert decide(Retry(7), attempt=1, max_attempts=3, policy=policy).delay_seconds == 7
    snooze = decide(Snooze(5), attempt=3, max_attempts=3, policy=policy)
    assert (snooze.kind, snooze.delay_seconds) == ("snooze", 5)
    assert decide(Cancel("no"), attempt=1, max_attempts=3, policy=policy).reason == "cancelled"
    assert decide(NonRetryable("x"), attempt=1, max_attempts=3, policy=policy).reason == (
        "non_retryable"
    )
    custom = decide(
        KeyError("k"), attempt=1, max_attempts=3, policy=policy, non_retryable=(KeyError,)
    )
    assert custom.reason == "non_retryable"


def test_error_text_is_bounded() -> None:
    try:
        raise RuntimeError("y" * 50_000)
    except RuntimeError as exc:
        text = format_error(exc)
    assert len(text) <= MAX_ERROR_CHARS
    assert text.startswith("RuntimeError: yyy") and "characters cut" in text


def test_delays_must_be_non_negative() -> None:
    with pytest.raises(ValueError):
        Retry(-1)
    with pytest.raises(ValueError):
        RetryPolicy(multiplier=0.5)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0.0s"),
        (0.26, "0.3s"),
        (45.9, "45s"),
        (725.4, "12m05s"),
        (12000, "3h20m"),
        (187200, "2d04h"),
    ],
)
def test_status_ages_are_short_and_readable(seconds: float, shown: str) -> None:
    from pgqueue.status import describe_seconds

    assert describe_seconds(seconds) == shown


def test_status_limits_in_words() -> None:
    from pgqueue.status import describe_limits

    assert describe_limits({}) == "-"
    assert (
        describe_limits(
            {
                "concurrency_limit": 5,
                "rate_limit": 100,
                "rate_interval_seconds": 0.5,
                "max_depth": 10,
            }
        )
        == "concurrency 5, rate 100/0.5s, max depth 10"
    )


def test_status_marks_every_estimated_count() -> None:
    from pgqueue.status import count_cells

    row = {"ready": 1668, "scheduled": 3332, "running": 0, "waiting": 0, "dead": 2}
    assert count_cells({**row, "counts_estimated": True}) == ["~1668", "~3332", "0", "0", "2"]
    assert count_cells({**row, "counts_estimated": False}) == ["1668", "3332", "0", "0", "2"]
    deep = {"ready": 2001, "scheduled": 0, "running": 2001, "waiting": 7000, "dead": 3}
    assert count_cells({**deep, "counts_estimated": True}) == ["2001+", "~0", "2001+", "~7000", "3"]
    exact = {"ready": 1500, "scheduled": 500, "running": 1, "waiting": 2500, "dead": 0}
    assert count_cells({**exact, "counts_estimated": True}) == ["1500", "500", "1", "~2500", "0"]


def test_a_claimed_batch_decodes_at_once_and_a_bad_value_stays_on_its_row() -> None:
    texts = ['{"i": 1}', "[]", '"text, with a comma"', "null", '{"x": [1, {"y": 2.5}]}']
    assert loads_many(texts) == [{"i": 1}, [], "text, with a comma", None, {"x": [1, {"y": 2.5}]}]
    deep = '{"n": ' + "[" * 5000 + "]" * 5000 + "}"
    decoded = loads_many(['{"i": 1}', deep, '{"big": 1.0e400}', '{"i": 2}'])
    assert decoded[0] == {"i": 1} and decoded[3] == {"i": 2}
    assert isinstance(decoded[1], Undecodable) and "RecursionError" in decoded[1].error
    assert isinstance(decoded[2], Undecodable) and "does not fit a float" in decoded[2].error
    # Two values in one text would shift every later row: refused, row by row.
    shifted = loads_many(["1, 2", "3"])
    assert isinstance(shifted[0], Undecodable) and shifted[1] == 3
    assert loads_many([]) == []


def test_job_times_survive_the_epoch_float_of_the_claim() -> None:
    from datetime import datetime, timedelta, timezone

    from pgqueue.job import _from_epoch

    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    start = datetime(2026, 11, 25, 23, 59, 59, 999_000, tzinfo=timezone.utc)
    for step in range(0, 200_000, 7):
        stored = start + timedelta(microseconds=step)
        # What date_part('epoch', ...) returns: the nearest float8 to the stored instant.
        seconds = (stored - epoch) / timedelta(microseconds=1) / 1_000_000
        assert _from_epoch(seconds) == stored


def test_encode_matches_the_standard_encoder_and_names_a_cycle() -> None:
    import json

    values: list[Any] = [
        {"a": [1, 2.5, -0.0, 1e-7, 10**40, None, True, 'é\n"\\\u2028'], "": {}},
        [],
        "text",
        {1: "int key", 2.5: "float key", None: "null key"},
    ]
    for value in values:
        assert encode(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    cyclic: dict[str, Any] = {"n": 1}
    cyclic["self"] = cyclic
    with pytest.raises(ValueError, match=r"args\['self'\]\['self'\]"):
        encode(cyclic)
