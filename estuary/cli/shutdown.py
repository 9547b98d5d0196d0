"""A bound on how long a role takes to stop after SIGINT/SIGTERM.

A coordinator with a local worker, or a worker group, may be in the middle of a job when
the signal arrives: an evaluation, or an artifact build whose ONNX export cannot be
interrupted from Python. Waiting for it made a stop take 36 s, and leaving the interpreter
while a thread was still inside torch ended in ``terminate called without an active
exception`` (a C++ abort, exit 134). The job needs neither: it is acknowledged only when its
result is recorded, so an unfinished job stays pending and another worker reclaims it.

:class:`ShutdownDeadline` is armed when the signal arrives. If the orderly shutdown has not
finished ``grace_s`` later, or finishes with a worker thread still running, it logs what it
abandons and ends the process at once with :attr:`ExitCode.INTERRUPTED`, skipping the
interpreter teardown that would abort.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import NoReturn

from estuary.cli.exit_codes import ExitCode
from estuary.clock import SYSTEM_CLOCK, Clock

__all__ = ["DEFAULT_SHUTDOWN_GRACE_S", "ShutdownDeadline", "hard_exit"]

log = logging.getLogger(__name__)

#: Default bound on a stop: drain in-flight RPCs and let a short job finish. Below the
#: 90 s systemd and 30 s Kubernetes give before SIGKILL.
DEFAULT_SHUTDOWN_GRACE_S = 10.0


def hard_exit(code: int) -> NoReturn:
    """Flush logs and standard streams, then end the process without interpreter teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken pipe
            stream.flush()
    os._exit(code)


class ShutdownDeadline:
    """End the process ``grace_s`` after :meth:`arm` unless :meth:`finish` came first.

    Parameters
    ----------
    grace_s
        Seconds the orderly shutdown may take once the signal arrived.
    what
        What is stopping, for the log line (``"coordinator"``, ``"worker group g0"``).
    clock
        Clock the grace period is measured on.
    exit
        Called with the exit code when the deadline passes; :func:`hard_exit` in
        production, a recorder in tests.

    Raises
    ------
    ValueError
        If ``grace_s`` is not a finite number > 0.
    """

    def __init__(
        self,
        grace_s: float,
        *,
        what: str,
        clock: Clock = SYSTEM_CLOCK,
        exit: Callable[[int], object] = hard_exit,
    ) -> None:
        if not 0 < grace_s < float("inf"):
            raise ValueError(f"grace_s: must be a finite number > 0, got {grace_s}")
        self.grace_s = float(grace_s)
        self.what = what
        self._clock = clock
        self._exit = exit
        self._done = threading.Event()
        self._armed = False
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._finished = False

    def arm(self) -> None:
        """Start the grace period (idempotent: a second signal does not extend it)."""
        with self._lock:
            if self._armed:
                return
            self._armed = True
        log.info("stopping %s: up to %g s for work in progress", self.what, self.grace_s)
        self._watcher = threading.Thread(target=self._watch, name="shutdown-deadline", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        if not self._clock.wait(self._done, self.grace_s):
            if self._finished:
                log.warning(
                    "%s stopped, but leaving the process took past %g s; exiting now",
                    self.what,
                    self.grace_s,
                )
            else:
                log.error(
                    "%s did not stop within %g s; exiting now (a job in progress is not "
                    "acknowledged, so another worker reclaims it)",
                    self.what,
                    self.grace_s,
                )
            self._exit(ExitCode.INTERRUPTED)

    def finish(self, lingering: Iterable[threading.Thread] = ()) -> None:
        """Mark the orderly shutdown done; end the process now if a thread still runs.

        Before :meth:`arm` (no signal came) this cancels the deadline. After it, the
        deadline keeps running until the process has gone: leaving the interpreter counts
        against the grace period too.

        Parameters
        ----------
        lingering
            Threads that must have ended (a local worker); any still alive would abort
            the interpreter's teardown, so the process ends here instead.
        """
        alive = [thread.name for thread in lingering if thread.is_alive()]
        with self._lock:
            # After a signal the grace period bounds the whole stop, the interpreter's
            # teardown included (joining executor threads and exporter processes took 3.5
            # to 9.5 s more after the orderly part, past a 10 s grace): the watcher stays
            # armed and ends the process if the exit itself lingers.
            self._finished = True
            if not self._armed:
                self._done.set()
        if alive:
            log.error(
                "%s stopped with %s still running a job; exiting now (the job is not "
                "acknowledged, so another worker reclaims it)",
                self.what,
                ", ".join(alive),
            )
            self._exit(ExitCode.INTERRUPTED)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the watcher thread (tests)."""
        if self._watcher is not None:
            self._watcher.join(timeout)
