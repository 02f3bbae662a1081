"""Run an awaitable under a deadline without an extra task where the Python version allows."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, raising ``asyncio.TimeoutError`` after ``seconds``.

    On Python 3.11+ this uses ``asyncio.timeout`` (no task per call: it matters on the
    hot path, once per job or delivery); before that, ``asyncio.wait_for``.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)
