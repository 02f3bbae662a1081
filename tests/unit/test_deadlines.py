"""DeadlineWatch: many concurrent deadlines from one periodic scan."""

from __future__ import annotations

import asyncio

import pytest

from pgqueue.timeouts import DeadlineWatch


async def _watched(watch: DeadlineWatch, seconds: float, work: float) -> str:
    async with watch.limit(seconds, f"gave up after {seconds}s"):
        await asyncio.sleep(work)
    return "done"


async def test_blocks_past_their_deadline_time_out_and_the_others_finish() -> None:
    watch = DeadlineWatch(0.01)
    runner = asyncio.create_task(watch.run())
    try:
        results = await asyncio.gather(
            _watched(watch, 0.05, 10.0),
            _watched(watch, 1.0, 0.02),
            _watched(watch, 0.05, 10.0),
            return_exceptions=True,
        )
    finally:
        runner.cancel()
    assert results[1] == "done"
    for timed_out in (results[0], results[2]):
        assert isinstance(timed_out, asyncio.TimeoutError)
        assert str(timed_out) == "gave up after 0.05s"


async def test_a_task_goes_on_after_its_block_timed_out() -> None:
    watch = DeadlineWatch(0.01)
    runner = asyncio.create_task(watch.run())

    async def times_out_then_goes_on() -> int:
        with pytest.raises(asyncio.TimeoutError):
            await _watched(watch, 0.03, 10.0)
        current = asyncio.current_task()
        assert current is not None and getattr(current, "cancelling", lambda: 0)() == 0
        async with asyncio.timeout(5.0) if hasattr(asyncio, "timeout") else _nothing():
            await asyncio.sleep(0.01)
        return 1

    try:
        assert await asyncio.create_task(times_out_then_goes_on()) == 1
    finally:
        runner.cancel()


class _nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_a_cancellation_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    watch = DeadlineWatch(0.01)
    runner = asyncio.create_task(watch.run())
    try:
        task = asyncio.create_task(_watched(watch, 10.0, 10.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        runner.cancel()
