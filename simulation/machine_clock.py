"""The real-time simulation's clock: it runs slower when the machine is busy.

``estuary simulate`` runs a coordinator and a dozen edge agents in one process on one
machine, and every deadline of the federation (key-exchange stages, the upload deadline,
silence, heartbeats, pacing) is a number of seconds on the injected clock. Those numbers
fit the work on an otherwise idle machine; on a busy one (other processes competing for
the cores) the same work takes several times as long in wall time, cohorts time out in
key exchange and no version is ever committed.

So the federation of a simulation reads a :class:`DilatedClock`: one clock second is the
wall time in which this process gets one second of the CPU it asked for. Its rate (clock
seconds per wall second, in ``(0, 1]``) is measured every :data:`SAMPLE_INTERVAL_S` by
:class:`ContentionProbe` from the kernel's per-thread scheduler statistics: of the time our
threads were runnable, how much they actually ran, relative to what an idle machine would
have given them (all of it, up to one core per thread). The work the federation does per
clock second is thus the same on an idle and on a loaded machine, and so are its deadlines'
margins: the deadlines are derived from the speed measured while the run goes on, not
fixed at start-up, so a load that comes or goes mid-run is followed too.

Our own threads competing with each other (sixteen agents training on two cores) do not
slow the clock: that is the work the deadlines were set for. Only time taken by *other*
processes does. Where the statistics are not available (no ``/proc``), the rate stays 1:
the plain wall clock, as before.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from estuary.clock import SYSTEM_CLOCK, Clock

__all__ = [
    "MIN_RATE",
    "SAMPLE_INTERVAL_S",
    "ContentionProbe",
    "DilatedClock",
    "LoadGovernor",
    "RateStats",
    "contention_rate",
]

log = logging.getLogger(__name__)

#: Slowest the clock may run, in clock seconds per wall second. A machine that gives us
#: less than 1/20 of what we ask for still ticks the coordinator every 10 s of wall time
#: (its 0.5 s tick), well inside the 30 s lease a commit holds in the store, whose expiry
#: a Redis server measures in wall time.
MIN_RATE = 0.05
#: Wall seconds between two measurements: long enough that a sample spans several of the
#: kernel's scheduling periods (a few ms each), short enough to follow a load that starts
#: mid-run within a second or two.
SAMPLE_INTERVAL_S = 0.5
#: Weight of the newest sample in the rate (exponential smoothing): about two samples'
#: memory, so one noisy half-second neither stalls nor races the clock.
SMOOTHING = 0.5
#: Least average number of our threads runnable during a sample for it to say anything:
#: below that the process was idle (waiting on sockets and timers) and the rate is kept.
MIN_RUNNABLE = 0.05
#: Longest real sleep between two looks at the clock while waiting on it: a wait follows a
#: rate that changes under it within this many wall seconds.
MAX_SLICE_S = 0.25
#: Change of the rate worth a log line (at most one per :data:`LOG_EVERY_S`): the log says
#: when the machine got busy or free without a line per sample.
LOG_CHANGE = 0.15
LOG_EVERY_S = 30.0


def contention_rate(cpu_s: float, runnable_s: float, wall_s: float, *, cores: int) -> float | None:
    """Return the share of the CPU our threads got of what an idle machine would give.

    Parameters
    ----------
    cpu_s
        CPU seconds our threads ran during the sample (all threads together).
    runnable_s
        Seconds our threads were runnable (running or waiting for a core), all together;
        at least ``cpu_s``.
    wall_s
        Wall seconds of the sample (> 0).
    cores
        Cores this process may run on (≥ 1).

    Returns
    -------
    float or None
        ``cpu_s / (min(runnable_s / wall_s, cores) · wall_s)``, clipped to
        ``[MIN_RATE, 1]``: 1 when we ran whenever we could (up to one core per runnable
        thread and ``cores`` in all), less when others took the cores. ``None`` when our
        threads were hardly runnable (the sample says nothing about contention).

    Raises
    ------
    ValueError
        If an argument is negative, ``wall_s`` is not positive or ``cores`` < 1.
    """
    if not wall_s > 0:
        raise ValueError(f"wall_s: must be > 0, got {wall_s}")
    if cores < 1:
        raise ValueError(f"cores: must be >= 1, got {cores}")
    if cpu_s < 0 or runnable_s < 0:
        raise ValueError(f"cpu_s and runnable_s: must be >= 0, got {cpu_s}, {runnable_s}")
    runnable = runnable_s / wall_s  # average number of our threads wanting a core
    if runnable < MIN_RUNNABLE:
        return None
    demand = min(runnable, float(cores)) * wall_s  # CPU seconds an idle machine would give
    return min(1.0, max(MIN_RATE, cpu_s / demand))


def _read_schedstat(task_dir: Path) -> dict[str, tuple[int, int]]:
    """Return ``{thread id: (ns on a CPU, ns waiting on a run queue)}`` of a process."""
    stats: dict[str, tuple[int, int]] = {}
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return stats
    for tid in tids:
        try:
            fields = (task_dir / tid / "schedstat").read_text().split()
            stats[tid] = (int(fields[0]), int(fields[1]))
        except (OSError, ValueError, IndexError):
            continue  # the thread ended between listing and reading
    return stats


class ContentionProbe:
    """Measures :func:`contention_rate` of this process between two calls of :meth:`sample`.

    Reads ``/proc/self/task/*/schedstat`` (Linux): per thread, nanoseconds on a CPU and
    nanoseconds runnable but waiting. A thread that started since the last sample counts
    from zero (all of its time is in the sample); a thread that ended loses its last part.

    Parameters
    ----------
    read
        Returns the per-thread counters; injected for tests.
    wall
        Monotonic wall clock in seconds; injected for tests.
    cores
        Cores available; default: the process's CPU affinity.
    """

    def __init__(
        self,
        *,
        read: Callable[[], Mapping[str, tuple[int, int]]] | None = None,
        wall: Callable[[], float] = time.monotonic,
        cores: int | None = None,
    ) -> None:
        if cores is not None and cores < 1:
            raise ValueError(f"cores: must be >= 1, got {cores}")
        task_dir = Path("/proc/self/task")
        self._read = read if read is not None else (lambda: _read_schedstat(task_dir))
        self._wall = wall
        self.cores = cores if cores is not None else _available_cores()
        self._last = dict(self._read())
        self._last_wall = wall()

    @property
    def available(self) -> bool:
        """Whether the counters exist here (else every sample is ``None``)."""
        return bool(self._last)

    def sample(self) -> float | None:
        """Return the contention rate since the previous call (``None``: no information)."""
        now_stats = dict(self._read())
        now = self._wall()
        wall_s = now - self._last_wall
        cpu_ns = wait_ns = 0
        for tid, (cpu, wait) in now_stats.items():
            before_cpu, before_wait = self._last.get(tid, (0, 0))
            cpu_ns += max(0, cpu - before_cpu)
            wait_ns += max(0, wait - before_wait)
        self._last, self._last_wall = now_stats, now
        if not now_stats or wall_s <= 0:
            return None
        cpu_s, wait_s = cpu_ns / 1e9, wait_ns / 1e9
        return contention_rate(cpu_s, cpu_s + wait_s, wall_s, cores=self.cores)


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class DilatedClock(Clock):
    """A clock that advances ``rate`` seconds per second of ``base``, ``rate`` in (0, 1].

    :meth:`monotonic` is the integral of the rate over ``base``'s monotonic time since
    construction; :meth:`time` is ``base.time()`` at construction plus that, so it falls
    behind the wall clock while the machine is busy. Every reader in one process (the
    coordinator, its local worker, the edge agents, the in-memory store) must read the
    same instance: signed timestamps and stored deadlines are compared across them.

    Waits (:meth:`sleep`, :meth:`sleep_async`, :meth:`wait`) last until this clock has
    advanced by the amount asked, looking again at least every :data:`MAX_SLICE_S` wall
    seconds, so a rate that changes during a wait is followed.

    Parameters
    ----------
    base
        The wall clock underneath (:data:`~estuary.clock.SYSTEM_CLOCK`; tests pass a
        :class:`~estuary.clock.VirtualClock`).
    """

    def __init__(self, base: Clock = SYSTEM_CLOCK) -> None:
        self._base = base
        self._lock = threading.Lock()
        self._epoch = base.time()
        self._anchor_base = base.monotonic()
        self._anchor = 0.0
        self._rate = 1.0

    @property
    def base(self) -> Clock:
        """The wall clock underneath."""
        return self._base

    @property
    def rate(self) -> float:
        """Clock seconds per wall second now."""
        with self._lock:
            return self._rate

    def set_rate(self, rate: float) -> None:
        """Run at ``rate`` from now on (time already elapsed keeps its old rate).

        Raises
        ------
        ValueError
            If ``rate`` is not in ``(0, 1]``.
        """
        if not 0 < rate <= 1:
            raise ValueError(f"rate: must be in (0, 1], got {rate}")
        with self._lock:
            now = self._base.monotonic()
            self._anchor += (now - self._anchor_base) * self._rate
            self._anchor_base = now
            self._rate = rate

    def monotonic(self) -> float:  # noqa: D102
        with self._lock:
            return self._anchor + (self._base.monotonic() - self._anchor_base) * self._rate

    def time(self) -> float:  # noqa: D102
        return self._epoch + self.monotonic()

    def _real_slice(self, target: float) -> float:
        """Wall seconds to sleep towards clock time ``target`` (0 once it is reached)."""
        with self._lock:
            now = self._anchor + (self._base.monotonic() - self._anchor_base) * self._rate
            rate = self._rate
        remaining = target - now
        if remaining <= 0:
            return 0.0
        return min(MAX_SLICE_S, remaining / rate)

    def sleep(self, seconds: float) -> None:  # noqa: D102
        target = self.monotonic() + max(0.0, seconds)
        while (step := self._real_slice(target)) > 0:
            self._base.sleep(step)

    async def sleep_async(self, seconds: float) -> None:  # noqa: D102
        target = self.monotonic() + max(0.0, seconds)
        while (step := self._real_slice(target)) > 0:
            await self._base.sleep_async(step)
        await asyncio.sleep(0)

    def wait(self, event: threading.Event, seconds: float) -> bool:  # noqa: D102
        target = self.monotonic() + max(0.0, seconds)
        while not event.is_set() and (step := self._real_slice(target)) > 0:
            self._base.wait(event, step)
        return event.is_set()

    def __repr__(self) -> str:
        return f"DilatedClock(rate={self.rate:.3f})"


@dataclass
class RateStats:
    """What the governor measured: clock seconds over wall seconds, and the slowest rate."""

    wall_s: float = 0.0
    clock_s: float = 0.0
    min_rate: float = 1.0
    samples: int = 0

    @property
    def mean_rate(self) -> float:
        """Clock seconds per wall second over the whole run (1 before any time passed)."""
        return self.clock_s / self.wall_s if self.wall_s > 0 else 1.0


class LoadGovernor:
    """Sets a :class:`DilatedClock`'s rate from a :class:`ContentionProbe`, in a thread.

    Every ``interval_s`` wall seconds: take a sample; if it says anything, smooth it into
    the rate (weight :data:`SMOOTHING`) and set it. Use as a context manager (or call
    :meth:`start` and :meth:`stop`).

    Parameters
    ----------
    clock
        The clock to drive.
    probe
        Where the contention comes from.
    interval_s
        Wall seconds between samples (> 0).
    """

    def __init__(
        self,
        clock: DilatedClock,
        probe: ContentionProbe,
        *,
        interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:
        if not (interval_s > 0 and math.isfinite(interval_s)):
            raise ValueError(f"interval_s: must be a positive number, got {interval_s}")
        self.clock = clock
        self.probe = probe
        self.interval_s = interval_s
        self.stats = RateStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_wall = 0.0
        self._started_clock = 0.0
        self._logged_rate = 1.0
        self._logged_at = -math.inf

    def step(self) -> float:
        """Take one sample and update the clock's rate; return the rate now."""
        measured = self.probe.sample()
        rate = self.clock.rate
        if measured is not None:
            rate = min(1.0, max(MIN_RATE, SMOOTHING * measured + (1 - SMOOTHING) * rate))
            self.clock.set_rate(rate)
            self.stats.samples += 1
            self.stats.min_rate = min(self.stats.min_rate, rate)
            self._log(rate)
        return rate

    def _log(self, rate: float) -> None:
        now = self.clock.base.monotonic()
        if abs(rate - self._logged_rate) < LOG_CHANGE or now - self._logged_at < LOG_EVERY_S:
            return
        self._logged_rate, self._logged_at = rate, now
        if rate >= 1 - LOG_CHANGE:
            log.info("the federation's clock runs at %.0f%% of the wall clock", 100 * rate)
            return
        log.info(
            "other processes hold the cores: the federation's clock runs at %.0f%% of the "
            "wall clock, its deadlines stretched to match",
            100 * rate,
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # the clock keeps its last rate; the run goes on
                log.exception("measuring the machine's load failed; the clock keeps its rate")

    def start(self) -> None:
        """Start sampling in a daemon thread."""
        if not self.probe.available:
            log.warning(
                "per-thread scheduler statistics are not available here (/proc); the "
                "federation's deadlines run on the wall clock and a busy machine may miss them"
            )
        self._started_wall = self.clock.base.monotonic()
        self._started_clock = self.clock.monotonic()
        self._thread = threading.Thread(target=self._loop, name="load-governor", daemon=True)
        self._thread.start()

    def stop(self) -> RateStats:
        """Stop sampling; return the totals of the run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.stats.wall_s = self.clock.base.monotonic() - self._started_wall
            self.stats.clock_s = self.clock.monotonic() - self._started_clock
        return self.stats

    def __enter__(self) -> LoadGovernor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
