"""Coalesce concurrent calls for the same key into one awaitable (in-process)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """``await group.do(key, fn)``: the first caller runs ``fn()``; callers that arrive while it
    runs share its result or exception. The shared task is shielded, so one caller's
    cancellation (a client disconnect) does not cancel the work for the others."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[T]] = {}

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        task = self._running.get(key)
        if task is None:
            async def run() -> T:
                try:
                    return await fn()
                finally:
                    self._running.pop(key, None)

            task = asyncio.get_running_loop().create_task(run())
            # Mark the exception retrieved even if every caller went away meanwhile.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._running[key] = task
        return await asyncio.shield(task)
