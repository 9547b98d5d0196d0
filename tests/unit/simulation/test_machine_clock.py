"""The simulation's load-following clock: its rate, its integral, its waits, its governor.

Everything runs over a :class:`~estuary.clock.VirtualClock` and injected scheduler
counters, so nothing here depends on how busy or fast the machine is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from estuary.clock import VirtualClock
from simulation.machine_clock import (
    MAX_SLICE_S,
    MIN_RATE,
    SMOOTHING,
    ContentionProbe,
    DilatedClock,
    LoadGovernor,
    contention_rate,
)

# ------------------------------------------------------------------- contention_rate


def test_an_idle_machine_runs_at_full_speed() -> None:
    # One thread runnable for the whole second and running all of it.
    assert contention_rate(1.0, 1.0, 1.0, cores=2) == 1.0


def test_our_own_threads_competing_do_not_slow_the_clock() -> None:
    # Eight of our threads runnable on two cores: each waits 3/4 of the time, but we got
    # both cores the whole second, all an idle machine would give.
    assert contention_rate(2.0, 8.0, 1.0, cores=2) == 1.0


def test_other_processes_holding_the_cores_slow_the_clock() -> None:
    # Four busy loops beside our eight threads on two cores: we get 8/12 of the cores.
    rate = contention_rate(2.0 * 8 / 12, 8.0, 1.0, cores=2)
    assert rate == pytest.approx(2 / 3)
    # One thread of ours among seventeen runnable: a twelfth of the core it asked for.
    assert contention_rate(1 / 12, 1.0, 1.0, cores=2) == pytest.approx(1 / 12)


def test_the_rate_has_a_floor_and_an_idle_process_says_nothing() -> None:
    assert contention_rate(0.001, 1.0, 1.0, cores=2) == MIN_RATE
    assert contention_rate(0.0, 0.01, 1.0, cores=2) is None


def test_contention_rate_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="wall_s"):
        contention_rate(1.0, 1.0, 0.0, cores=1)
    with pytest.raises(ValueError, match="cores"):
        contention_rate(1.0, 1.0, 1.0, cores=0)
    with pytest.raises(ValueError, match="cpu_s"):
        contention_rate(-1.0, 1.0, 1.0, cores=1)


@given(
    cpu=st.floats(0.0, 16.0),
    extra_wait=st.floats(0.0, 64.0),
    wall=st.floats(0.01, 10.0),
    cores=st.integers(1, 16),
)
def test_the_rate_is_always_a_speed_between_the_floor_and_one(
    cpu: float, extra_wait: float, wall: float, cores: int
) -> None:
    cpu = min(cpu, cores * wall)  # never more CPU than the cores give
    rate = contention_rate(cpu, cpu + extra_wait, wall, cores=cores)
    assert rate is None or MIN_RATE <= rate <= 1.0


# ------------------------------------------------------------------------ the probe


class _Counters:
    """Fake ``/proc/self/task/*/schedstat``: per thread (ns on a CPU, ns waiting)."""

    def __init__(self) -> None:
        self.threads: dict[str, tuple[int, int]] = {"1": (0, 0)}
        self.now = 0.0

    def run(self, tid: str, cpu_s: float, wait_s: float) -> None:
        cpu, wait = self.threads.get(tid, (0, 0))
        self.threads[tid] = (cpu + int(cpu_s * 1e9), wait + int(wait_s * 1e9))


def test_the_probe_measures_the_counters_between_two_samples() -> None:
    counters = _Counters()
    probe = ContentionProbe(read=lambda: dict(counters.threads), wall=lambda: counters.now, cores=2)

    counters.now = 1.0
    counters.run("1", 0.25, 0.75)  # ran a quarter of the second it wanted
    assert probe.sample() == pytest.approx(0.25)

    counters.now = 2.0
    counters.run("1", 0.5, 0.0)
    counters.run("7", 0.5, 0.0)  # a thread started during the sample counts from zero
    assert probe.sample() == pytest.approx(1.0)

    counters.now = 3.0  # nothing runnable: no information
    assert probe.sample() is None


def test_without_counters_the_probe_is_unavailable() -> None:
    probe = ContentionProbe(read=dict, wall=lambda: 0.0, cores=1)
    assert not probe.available and probe.sample() is None


# ------------------------------------------------------------------------ the clock


def test_the_clock_integrates_its_rate_over_wall_time() -> None:
    wall = VirtualClock(start=1000.0)
    clock = DilatedClock(wall)

    wall.advance(10.0)
    clock.set_rate(0.25)
    wall.advance(8.0)

    assert clock.monotonic() == pytest.approx(12.0)
    # Unix time starts at the wall's and falls behind it while the machine is busy.
    assert clock.time() == pytest.approx(1012.0)
    assert wall.time() == pytest.approx(1018.0)


@given(steps=st.lists(st.tuples(st.floats(0.0, 100.0), st.floats(0.01, 1.0)), max_size=20))
def test_clock_time_is_the_sum_of_wall_time_times_rate_and_never_goes_back(
    steps: list[tuple[float, float]],
) -> None:
    wall = VirtualClock()
    clock = DilatedClock(wall)
    expected, last = 0.0, 0.0
    for seconds, rate in steps:
        clock.set_rate(rate)
        wall.advance(seconds)
        expected += seconds * rate
        now = clock.monotonic()
        assert now >= last
        last = now
    assert clock.monotonic() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_a_deadline_on_a_busy_machine_takes_longer_in_wall_time() -> None:
    # A 15 s key-exchange stage at a quarter of full speed lasts 60 s of wall time: the
    # work that fits in 15 s on an idle machine still fits.
    wall = VirtualClock()
    clock = DilatedClock(wall)
    clock.set_rate(0.25)

    clock.sleep(15.0)

    assert wall.monotonic() == pytest.approx(60.0)
    assert clock.monotonic() == pytest.approx(15.0)


class _RecordingWall(VirtualClock):
    """A virtual wall clock that records each real sleep and then calls ``after_sleep``."""

    def __init__(self) -> None:
        super().__init__()
        self.slices: list[float] = []
        self.after_sleep: Callable[[], None] = lambda: None

    def sleep(self, seconds: float) -> None:
        self.slices.append(seconds)
        super().sleep(seconds)
        self.after_sleep()


def test_a_wait_follows_a_rate_that_changes_under_it() -> None:
    wall = _RecordingWall()
    clock = DilatedClock(wall)

    def load_arrives() -> None:
        if wall.monotonic() >= 1.0 and clock.rate == 1.0:
            clock.set_rate(0.5)  # one wall second in, other processes take half the CPU

    wall.after_sleep = load_arrives
    clock.sleep(2.0)

    assert max(wall.slices) <= MAX_SLICE_S
    # 1 s at full speed, then the remaining 1 s of clock at half speed: 2 s of wall.
    assert wall.monotonic() == pytest.approx(3.0)
    assert clock.monotonic() == pytest.approx(2.0)


def test_wait_returns_as_soon_as_the_event_is_set() -> None:
    clock = DilatedClock(VirtualClock())
    event = threading.Event()
    event.set()
    assert clock.wait(event, 100.0) is True
    assert clock.monotonic() == 0.0
    assert clock.wait(threading.Event(), 3.0) is False
    assert clock.monotonic() == pytest.approx(3.0)


def test_the_rate_must_be_a_speed() -> None:
    clock = DilatedClock(VirtualClock())
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="rate"):
            clock.set_rate(bad)


# ---------------------------------------------------------------------- the governor


class _Probe:
    available = True

    def __init__(self, samples: list[float | None]) -> None:
        self.samples = samples

    def sample(self) -> float | None:
        return self.samples.pop(0)


def test_the_governor_smooths_samples_into_the_rate_and_keeps_it_when_idle() -> None:
    clock = DilatedClock(VirtualClock())
    governor = LoadGovernor(clock, _Probe([0.2, None, 0.2]))  # type: ignore[arg-type]

    first = governor.step()
    assert first == pytest.approx(SMOOTHING * 0.2 + (1 - SMOOTHING) * 1.0)
    assert clock.rate == pytest.approx(first)
    assert governor.step() == pytest.approx(first)  # no information: unchanged
    second = governor.step()
    assert second == pytest.approx(SMOOTHING * 0.2 + (1 - SMOOTHING) * first)
    assert governor.stats.samples == 2 and governor.stats.min_rate == pytest.approx(second)


def test_the_governor_checks_its_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        LoadGovernor(DilatedClock(VirtualClock()), _Probe([]), interval_s=0.0)  # type: ignore[arg-type]
