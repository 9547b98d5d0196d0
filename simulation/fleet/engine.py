"""The discrete-event core: one virtual clock, one event heap, one recorder.

Everything the fleet simulator does happens in an event popped from :class:`EventQueue`
in virtual-time order (ties broken by insertion order, so a run is a function of its
inputs). Popping an event moves the :class:`~estuary.clock.VirtualClock` that the
coordinator service, the store and the ledger read; nothing waits in real time except
for the training results the core collects from its trainer.

:class:`Recorder` keeps what a policy's run produced: the event log (compared for
determinism), the held-out curve, bytes, wasted work, staleness, and where the
simulator's own wall time went (:class:`Overhead`).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from estuary.clock import VirtualClock
from simulation.fleet.trace import DeviceSpec, DeviceTrace, next_session
from simulation.report import StalenessHistogram

__all__ = ["DeviceState", "EventQueue", "Overhead", "Recorder"]


class EventQueue:
    """A heap of ``(time, seq, callback)``; :meth:`run` pops in order and moves the clock."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.start = clock.monotonic()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.popped = 0

    @property
    def now(self) -> float:
        """Virtual seconds since the run started."""
        return self.clock.monotonic() - self.start

    def at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at virtual time ``when`` (seconds since start; not before now)."""
        if not when >= self.now:  # also refuses NaN
            raise ValueError(f"when: {when} is before now ({self.now})")
        heapq.heappush(self._heap, (when, self._seq, callback))
        self._seq += 1

    def after(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` ``delay`` virtual seconds from now."""
        self.at(self.now + delay, callback)

    def run(self, *, until: float, stop: Callable[[], bool]) -> None:
        """Pop events until virtual time ``until``, ``stop()`` or an empty heap."""
        while self._heap and not stop():
            when, _seq, callback = self._heap[0]
            if when > until:
                break
            heapq.heappop(self._heap)
            self.clock.advance(max(0.0, when - self.now))
            self.popped += 1
            callback()
        if self.now < until and not stop() and not self._heap:
            self.clock.advance(max(0.0, until - self.now))


@dataclass
class Overhead:
    """Where the simulator's wall time went (seconds, perf_counter)."""

    total_s: float = 0.0
    training_wait_s: float = 0.0
    evaluation_s: float = 0.0
    cloud_jobs_s: float = 0.0
    #: Inside the coordinator service (admission, relay, secure-aggregation server,
    #: ledger, ticks): the system under simulation.
    service_s: float = 0.0
    #: The devices' own secure-aggregation work (key generation and agreement, share
    #: encryption, clipping and masking): device compute, like training, that the
    #: simulator performs for real in its one process.
    device_secagg_s: float = 0.0

    def core_s(self) -> float:
        """Wall time that was neither training, evaluation nor cloud jobs."""
        return self.total_s - self.training_wait_s - self.evaluation_s - self.cloud_jobs_s

    def simulator_s(self) -> float:
        """:meth:`core_s` less the devices' own secure-aggregation work (device compute)."""
        return self.core_s() - self.device_secagg_s


@dataclass
class Recorder:
    """What one policy's run produced."""

    policy: str
    log: list[tuple[float, str, int, str]] = field(default_factory=list)
    curve: list[tuple[float, int, int, float]] = field(default_factory=list)
    """``(virtual s, device updates accepted so far, version, held-out bits/byte)``."""
    bytes_up: int = 0
    bytes_down: int = 0
    tasks: int = 0
    trained: int = 0
    accepted: int = 0
    refused: int = 0
    aborted: int = 0
    discarded: int = 0
    dropouts: int = 0
    work_s: float = 0.0
    """Virtual device-seconds of training that ran to the end."""
    wasted_s: float = 0.0
    """Of ``work_s``: updates trained to the end and then aborted, refused or discarded."""
    dropout_s: float = 0.0
    """Device-seconds of training cut short by a dropout (the trace's doing)."""
    staleness: StalenessHistogram = field(default_factory=StalenessHistogram)
    """Updates folded into a version, by how many versions behind it they trained."""
    weight_staleness: StalenessHistogram = field(default_factory=StalenessHistogram)
    """Estuary only: accepted updates by the staleness their weight was fixed at (relay)."""
    max_training: int = 0
    overhead: Overhead = field(default_factory=Overhead)
    waits: dict[str, float] = field(default_factory=dict)
    """Virtual seconds spent per mechanism (summed over tasks): what costs the time."""

    def event(self, t: float, kind: str, device: int = -1, detail: str = "") -> None:
        """Append one line to the event log."""
        self.log.append((round(t, 6), kind, device, detail))

    def wait(self, mechanism: str, seconds: float) -> None:
        """Add ``seconds`` of virtual waiting to ``mechanism``."""
        self.waits[mechanism] = self.waits.get(mechanism, 0.0) + max(0.0, seconds)

    @property
    def wasted_fraction(self) -> float:
        """Wasted over completed device work (0 before any)."""
        return self.wasted_s / self.work_s if self.work_s > 0 else 0.0


class DeviceState:
    """One device's dynamic state in one policy's run: availability and what it does.

    Availability is drawn lazily from the device's own generator (seeded by the run
    seed and the device index), so every policy sees the same sessions for a device.
    """

    __slots__ = ("busy", "next_switch", "online", "rng", "spec", "task", "trace_class")

    def __init__(self, spec: DeviceSpec, trace: DeviceTrace, *, seed: int) -> None:
        self.spec = spec
        self.trace_class = next(c for c in trace.classes if c.name == spec.device_class)
        self.rng = np.random.default_rng([seed, spec.index, 0xA5A5])
        avail = self.trace_class.availability
        if avail.kind == "always":
            self.online = True
            self.next_switch = math.inf
        else:
            on, off = avail.mean_online_s, avail.mean_offline_s
            self.online = bool(self.rng.random() < on / (on + off))
            # Memoryless sessions: the residual of the current one is a fresh draw.
            self.next_switch = next_session(trace, avail, online=self.online, now=0.0, rng=self.rng)
        self.busy = False
        self.task: Any = None

    def advance(self, trace: DeviceTrace, now: float) -> None:
        """Roll the availability sessions forward to ``now``."""
        while self.next_switch <= now:
            self.online = not self.online
            start = self.next_switch
            self.next_switch = start + next_session(
                trace, self.trace_class.availability, online=self.online, now=start, rng=self.rng
            )

    def online_at(self, trace: DeviceTrace, now: float) -> bool:
        """Whether the device is reachable at ``now``."""
        self.advance(trace, now)
        return self.online

    def next_online(self, trace: DeviceTrace, now: float) -> float:
        """Return the first time ≥ ``now`` the device is online."""
        self.advance(trace, now)
        return now if self.online else self.next_switch

    def stays_online(self, trace: DeviceTrace, now: float, until: float) -> bool:
        """Whether the device is online from ``now`` through ``until``."""
        self.advance(trace, now)
        return self.online and self.next_switch > until


class Stopwatch:
    """Adds a ``with`` block's wall time to an attribute of :class:`Overhead`."""

    def __init__(self, overhead: Overhead, attribute: str) -> None:
        self.overhead = overhead
        self.attribute = attribute
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._start
        setattr(self.overhead, self.attribute, getattr(self.overhead, self.attribute) + elapsed)
