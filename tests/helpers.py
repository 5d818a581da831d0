"""Polling helpers: tests wait for a condition, never for a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_until(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``cond`` until it is truthy; fail with its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


async def async_wait_until(
    cond: Callable[[], object | Awaitable[object]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation timeout
    interval: float = 0.02,
) -> None:
    """The asyncio form of :func:`wait_until`; ``cond`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)
