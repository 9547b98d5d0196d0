"""A stop after SIGTERM is bounded, and never ends in a C++ abort from a thread left in a job."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from estuary.cli.exit_codes import ExitCode
from estuary.cli.shutdown import ShutdownDeadline
from estuary.clock import VirtualClock

#: How long a child may take to exit after SIGTERM before the test calls it a hang. The
#: bound under test is the child's 0.5 s grace, which its exit code and log line prove;
#: this only stops a hung child from stalling the suite (inside the suite's 300 s per
#: test). 60 s was too little for a child beside three xdist workers on 2 cores (a
#: clean-clone run failed on it).
HANG_GUARD_S = 240


def _deadline(grace_s: float, clock: VirtualClock, exits: list[int]) -> ShutdownDeadline:
    return ShutdownDeadline(grace_s, what="test role", clock=clock, exit=exits.append)


def test_deadline_ends_the_process_after_exactly_the_grace_period() -> None:
    clock, exits = VirtualClock(), []
    deadline = _deadline(7.5, clock, exits)
    deadline.arm()
    deadline.join(5)
    assert exits == [ExitCode.INTERRUPTED]
    assert clock.monotonic() == pytest.approx(7.5)


def test_a_shutdown_that_finished_first_is_left_alone() -> None:
    clock, exits = VirtualClock(), []
    deadline = _deadline(7.5, clock, exits)
    deadline.finish()
    deadline.arm()
    deadline.join(5)
    assert exits == []


def test_after_a_signal_the_grace_period_also_bounds_leaving_the_process() -> None:
    clock, exits = VirtualClock(), []
    deadline = _deadline(4.0, clock, exits)
    deadline.arm()
    deadline.finish()  # the orderly part is done; the interpreter's teardown is not
    deadline.join(5)
    assert exits == [ExitCode.INTERRUPTED]
    assert clock.monotonic() == pytest.approx(4.0)


def test_second_signal_does_not_restart_the_grace_period() -> None:
    clock, exits = VirtualClock(), []
    deadline = _deadline(3.0, clock, exits)
    deadline.arm()
    deadline.arm()
    deadline.join(5)
    assert exits == [ExitCode.INTERRUPTED]


def test_finish_with_a_thread_still_in_a_job_exits_now() -> None:
    exits: list[int] = []
    release = threading.Event()
    busy = threading.Thread(target=release.wait, name="local-worker-x", daemon=True)
    busy.start()
    try:
        _deadline(60, VirtualClock(), exits).finish([busy])
        assert exits == [ExitCode.INTERRUPTED]
    finally:
        release.set()
        busy.join()
    exits.clear()
    _deadline(60, VirtualClock(), exits).finish([busy])  # ended: nothing to do
    assert exits == []


@pytest.mark.parametrize("grace", [0.0, -1.0, float("inf"), float("nan")])
def test_grace_must_be_positive_and_finite(grace: float) -> None:
    with pytest.raises(ValueError, match="grace_s"):
        ShutdownDeadline(grace, what="x")


def test_sigterm_while_a_job_runs_exits_130_within_the_grace_period() -> None:
    # A real process: a thread that never finishes its "job", SIGTERM, a 0.5 s grace. Before
    # the bound existed the process waited for the job (36 s with a real export) and then
    # aborted in the interpreter's teardown.
    script = textwrap.dedent(
        """
        import logging, signal, sys, threading
        from estuary.cli.shutdown import ShutdownDeadline
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        stop = threading.Event()
        deadline = ShutdownDeadline(0.5, what="test worker")
        def on_term(signum, frame):
            stop.set()
            deadline.arm()
        signal.signal(signal.SIGTERM, on_term)
        job = threading.Thread(target=threading.Event().wait, name="job", daemon=False)
        job.start()
        print("ready", flush=True)
        stop.wait()
        job.join()  # the job never ends: only the deadline can end the process
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "test worker did not stop within 0.5 s" in err, err
    assert "terminate called" not in err


def test_sigterm_then_a_teardown_that_hangs_still_exits_130_within_the_grace_period() -> None:
    # The orderly shutdown finishes at once, then leaving the interpreter hangs (an atexit
    # join that never returns, as executor threads and exporter processes lingered for up
    # to 9.5 s after a coordinator logged "stopped").
    script = textwrap.dedent(
        """
        import atexit, logging, signal, sys, threading
        from estuary.cli.shutdown import ShutdownDeadline
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        stop = threading.Event()
        deadline = ShutdownDeadline(0.5, what="test coordinator")
        def on_term(signum, frame):
            stop.set()
            deadline.arm()
        signal.signal(signal.SIGTERM, on_term)
        atexit.register(threading.Event().wait)
        print("ready", flush=True)
        stop.wait()
        deadline.finish()
        sys.exit(130)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "test coordinator stopped, but leaving the process took past 0.5 s" in err, err
