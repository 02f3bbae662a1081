"""Long-lived tasks ("lanes") that run a process's claimed jobs or deliveries, not a task each."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
FanOut = Literal["all", "on_wait"]


class Lanes(Generic[T]):
    """Runs each item given to :meth:`push` on one of up to ``limit`` lanes.

    Creating and scheduling a task per item cost more than a no-op handler; a lane takes
    the next waiting item as soon as it is done with one. ``fan_out`` says how many lanes
    an arrival wakes:

    - ``"on_wait"`` (the worker): one lane at a time. A lane that takes an item while more
      are waiting wakes one more first, so handlers that wait on I/O fan out to ``limit``
      lanes, while handlers that finish without waiting run back to back on one lane.
    - ``"all"`` (the relay): every waiting item wakes a lane at once. A delivery always
      waits on the network, and a claimed batch must reach its sinks together (a circuit
      breaker then sees one wave of answers, not a trickle).

    ``run(item, lane)`` is given the lane's task, for the caller to cancel it past a grace
    period. After :meth:`close` lanes take no new item and end once idle; items still
    waiting are the caller's to hand back (:meth:`take_waiting`).
    """

    def __init__(
        self,
        run: Callable[[T, asyncio.Task[None]], Awaitable[None]],
        limit: int,
        *,
        fan_out: FanOut,
        name: str,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._run = run
        self._limit = limit
        self._fan_out_all = fan_out == "all"
        self._name = name
        self._waiting: deque[T] = deque()
        self._idle: list[asyncio.Future[None]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._waking = 0  # lanes woken or created that have not taken an item yet
        self._closed = False

    def push(self, item: T) -> None:
        """Queue ``item`` and wake a lane for it if the fan-out rule asks for one."""
        self._waiting.append(item)
        if self._wants_lane():
            self._wake()

    def take_waiting(self) -> list[T]:
        """Remove and return the items no lane has taken yet."""
        items = list(self._waiting)
        self._waiting.clear()
        return items

    def close(self) -> None:
        """Take no new items; idle lanes end now, busy ones when their item is done."""
        self._closed = True
        for waiter in self._idle:
            waiter.cancel()
        self._idle.clear()

    def _wants_lane(self) -> bool:
        if self._fan_out_all:
            return self._waking < len(self._waiting)
        return bool(self._waiting) and not self._waking

    def _wake(self) -> None:
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                self._waking += 1
                return
        if len(self.tasks) < self._limit:
            lane = asyncio.create_task(self._lane(), name=self._name)
            self.tasks.add(lane)
            lane.add_done_callback(self.tasks.discard)
            self._waking += 1

    async def _lane(self) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        self._waking -= 1
        while not self._closed:
            if self._waiting:
                item = self._waiting.popleft()
                if self._wants_lane():
                    self._wake()
                await self._run(item, me)
                continue
            waiter: asyncio.Future[None] = loop.create_future()
            self._idle.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                return
            self._waking -= 1
