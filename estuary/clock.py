"""The one injected clock: everything that waits, expires or measures age reads it.

Production code takes a :class:`Clock` argument defaulting to :data:`SYSTEM_CLOCK`.
Tests and the scale simulator pass a :class:`VirtualClock`, which moves only when told
(or when code sleeps on it), so no test depends on how fast the machine is and a
simulated hour costs what its computation costs.

Two readings: :meth:`Clock.time` is Unix-epoch seconds, the one to store (deadlines,
``committed_at``, heartbeats: every replica reads them from the shared store, so they
must be comparable across processes); :meth:`Clock.monotonic` never goes backwards,
for intervals measured inside one process (idle time, rate-limit buckets).
"""

from __future__ import annotations

import abc
import asyncio
import threading
import time

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "VirtualClock"]


class Clock(abc.ABC):
    """A source of time that can also be waited on."""

    @abc.abstractmethod
    def time(self) -> float:
        """Return Unix-epoch seconds (the value to store and compare across replicas)."""

    @abc.abstractmethod
    def monotonic(self) -> float:
        """Return seconds from an arbitrary origin that never decrease (in-process intervals)."""

    @abc.abstractmethod
    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds`` of this clock's time."""

    @abc.abstractmethod
    async def sleep_async(self, seconds: float) -> None:
        """Suspend the calling coroutine for ``seconds`` of this clock's time."""

    @abc.abstractmethod
    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``event``; return whether it is set."""

    def time_ms(self) -> int:
        """Return :meth:`time` in whole Unix-epoch milliseconds."""
        return int(self.time() * 1000)


class SystemClock(Clock):
    """The machine's clocks: :func:`time.time`, :func:`time.monotonic`, real sleeps."""

    def time(self) -> float:  # noqa: D102
        return time.time()

    def monotonic(self) -> float:  # noqa: D102
        return time.monotonic()

    def sleep(self, seconds: float) -> None:  # noqa: D102
        time.sleep(max(0.0, seconds))

    async def sleep_async(self, seconds: float) -> None:  # noqa: D102
        await asyncio.sleep(max(0.0, seconds))

    def wait(self, event: threading.Event, seconds: float) -> bool:  # noqa: D102
        return event.wait(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


#: The production clock, the default of every ``clock=`` argument.
SYSTEM_CLOCK: Clock = SystemClock()


class VirtualClock(Clock):
    """A clock that moves only when advanced; sleeping on it advances it.

    ``time()`` starts at ``start`` (Unix seconds; the default is a fixed date, so runs
    are reproducible) and ``monotonic()`` at 0; both advance together. A sleep or a
    :meth:`wait` that times out advances the clock by its duration and returns at once:
    a single-threaded driver (a unit test, the discrete-event simulator) thus sees
    exactly the waits the code asked for, in order, without any real waiting.

    Parameters
    ----------
    start
        Initial :meth:`time` in Unix seconds.

    Raises
    ------
    ValueError
        If ``start`` is negative or not finite.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        if not start >= 0 or start == float("inf"):
            raise ValueError(f"start: must be a finite number >= 0, got {start}")
        self._start = float(start)
        self._elapsed = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:  # noqa: D102
        with self._lock:
            return self._start + self._elapsed

    def monotonic(self) -> float:  # noqa: D102
        with self._lock:
            return self._elapsed

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds``; return the new :meth:`time`.

        Raises
        ------
        ValueError
            If ``seconds`` is negative or not finite: time never runs backwards.
        """
        if not 0 <= seconds < float("inf"):
            raise ValueError(f"seconds: must be a finite number >= 0, got {seconds}")
        with self._lock:
            self._elapsed += seconds
            return self._start + self._elapsed

    def advance_to(self, when: float) -> float:
        """Move the clock to Unix time ``when`` if that is later; return the new time."""
        with self._lock:
            self._elapsed = max(self._elapsed, when - self._start)
            return self._start + self._elapsed

    def sleep(self, seconds: float) -> None:  # noqa: D102
        self.advance(max(0.0, seconds))

    async def sleep_async(self, seconds: float) -> None:  # noqa: D102
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # still yield, so other tasks run in between

    def wait(self, event: threading.Event, seconds: float) -> bool:  # noqa: D102
        if not event.is_set():
            self.advance(max(0.0, seconds))
        return event.is_set()

    def __repr__(self) -> str:
        return f"VirtualClock(time={self.time():.3f})"
