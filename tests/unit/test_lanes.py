"""Lanes: how many long-lived tasks run the items, and what happens at close."""

from __future__ import annotations

import asyncio

import pytest

from pgqueue.lanes import FanOut, Lanes


class Recorder:
    """Runs items, remembering which lane ran each and how many ran at once."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.hold = hold
        self.lanes: dict[int, asyncio.Task[None]] = {}
        self.busy = 0
        self.most_busy = 0
        self.done: list[int] = []

    async def run(self, item: int, lane: asyncio.Task[None]) -> None:
        assert lane is asyncio.current_task()
        self.lanes[item] = lane
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        if self.hold is not None:
            await self.hold.wait()
        self.busy -= 1
        self.done.append(item)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_items_that_never_wait_run_back_to_back_on_one_lane() -> None:
    recorder = Recorder()
    lanes: Lanes[int] = Lanes(recorder.run, 10, fan_out="on_wait", name="t")
    for item in range(50):
        lanes.push(item)
    await settle()
    assert recorder.done == list(range(50))
    assert len(set(recorder.lanes.values())) == 1
    lanes.close()


@pytest.mark.parametrize("fan_out", ["on_wait", "all"])
async def test_waiting_items_fan_out_up_to_the_limit(fan_out: FanOut) -> None:
    hold = asyncio.Event()
    recorder = Recorder(hold)
    lanes: Lanes[int] = Lanes(recorder.run, 4, fan_out=fan_out, name="t")
    for item in range(10):
        lanes.push(item)
    await settle()
    assert recorder.busy == 4 and len(lanes.tasks) == 4
    hold.set()
    await settle()
    assert sorted(recorder.done) == list(range(10))
    assert recorder.most_busy == 4
    lanes.close()
    await settle()
    assert not lanes.tasks


async def test_all_wakes_a_lane_per_item_at_once_on_wait_one_more_per_take() -> None:
    for fan_out, expected in (("all", 5), ("on_wait", 1)):
        hold = asyncio.Event()
        recorder = Recorder(hold)
        lanes: Lanes[int] = Lanes(recorder.run, 10, fan_out=fan_out, name="t")  # type: ignore[arg-type]
        for item in range(5):
            lanes.push(item)
        await asyncio.sleep(0)  # one loop turn: only the lanes woken by push() have run
        assert recorder.busy == expected, fan_out
        hold.set()
        await settle()
        lanes.close()


async def test_after_close_lanes_take_nothing_new_and_the_waiting_items_come_back() -> None:
    hold = asyncio.Event()
    recorder = Recorder(hold)
    lanes: Lanes[int] = Lanes(recorder.run, 2, fan_out="all", name="t")
    for item in range(5):
        lanes.push(item)
    await settle()
    assert recorder.busy == 2
    lanes.close()
    assert lanes.take_waiting() == [2, 3, 4]
    hold.set()
    await settle()
    assert sorted(recorder.done) == [0, 1]  # the busy ones finish their item, then end
    assert not lanes.tasks
    lanes.push(9)
    await settle()
    assert 9 not in recorder.done and lanes.take_waiting() == [9]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        Lanes(Recorder().run, 0, fan_out="all", name="t")
