"""Waiting in the async tests of a live call (tests/test_call.py, tests/test_two_way.py)."""

from __future__ import annotations

import asyncio
from typing import Callable


async def wait_until(cond: Callable[[], object], timeout: float = 30.0, step: float = 0.05) -> None:
    """Poll `cond` every `step` seconds; AssertionError after `timeout`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("timed out waiting for the call")
        await asyncio.sleep(step)
