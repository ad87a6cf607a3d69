"""Helpers of the async tests of a live call (tests/test_call.py, test_two_way.py, test_audio.py): waiting, and a program run as a task."""

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


class Running:
    """A program's amain as a task, with its object once created."""

    def __init__(self, module, argv: list[str]) -> None:
        self.stop = asyncio.Event()
        self.obj = None
        self.task = asyncio.ensure_future(module.amain(module.parse_args(argv), self.stop, self._started))

    def _started(self, obj) -> None:
        self.obj = obj

    async def finish(self, timeout: float = 20.0):
        self.stop.set()
        return await asyncio.wait_for(self.task, timeout)
