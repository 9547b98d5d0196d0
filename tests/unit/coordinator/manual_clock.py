"""Test helper: a clock that moves only when the test advances it, and whose sleeps wait.

:class:`estuary.clock.VirtualClock` jumps forward when code sleeps on it, which suits a
single-threaded driver but not code that races a sleep against real I/O (a stream read
against an idle timer): there the sleep would always win at once. On a
:class:`ManualClock` a sleep really waits, until the test calls :meth:`ManualClock.advance`
past its deadline, so a test decides exactly when every timer fires.
"""

from __future__ import annotations

import asyncio
import threading

from estuary.clock import Clock

#: Real seconds between checks of a :meth:`ManualClock.wait` for its event.
_WAIT_POLL_S = 0.01


class ManualClock(Clock):
    """A clock at ``start`` that moves only by :meth:`advance`; sleeps wait for it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._start = start
        self._now = 0.0
        self._cond = threading.Condition()
        self._sleepers: list[tuple[float, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def time(self) -> float:
        with self._cond:
            return self._start + self._now

    def monotonic(self) -> float:
        with self._cond:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds`` and wake every sleep whose deadline has come."""
        if not seconds >= 0:
            raise ValueError(f"seconds: must be >= 0, got {seconds}")
        with self._cond:
            self._now += seconds
            due = [s for s in self._sleepers if s[0] <= self._now]
            self._sleepers = [s for s in self._sleepers if s[0] > self._now]
            self._cond.notify_all()
        for _, loop, future in due:
            loop.call_soon_threadsafe(_wake, future)

    def sleep(self, seconds: float) -> None:
        with self._cond:
            deadline = self._now + seconds
            self._cond.wait_for(lambda: self._now >= deadline)

    async def sleep_async(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            deadline = self._now + seconds
            if deadline <= self._now:
                return
            self._sleepers.append((deadline, loop, future))
        try:
            await future
        finally:
            with self._cond:
                self._sleepers = [s for s in self._sleepers if s[2] is not future]

    def wait(self, event: threading.Event, seconds: float) -> bool:
        with self._cond:
            deadline = self._now + seconds
        while not event.is_set():
            with self._cond:
                if self._now >= deadline:
                    break
                self._cond.wait(_WAIT_POLL_S)
        return event.is_set()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
