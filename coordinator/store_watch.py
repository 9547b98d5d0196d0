"""The store health watcher: its own thread, one short probe per period.

A replica's health (``grpc.health.v1``: SERVING only while the state store answers) must
follow the store even when every request handler is blocked on it. So the watcher shares
nothing with the handlers: it runs on a thread of its own, and each probe is a single PING
on a dedicated connection with a short timeout (:meth:`estuary.state.base.Store.probe`),
not the pooled, retried :meth:`~estuary.state.base.Store.ping` whose worst case is
attempts × socket timeout (15 s by default).

The store is taken as silent from the first failed probe: health turns NOT_SERVING, and
the handler pool refuses requests, at most ``interval_s + timeout_s`` after the store
stopped answering (a probe starts every ``interval_s`` of the injected clock and gives up
after ``timeout_s`` of real socket time). It is taken as back from the first probe that
answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.log import log_context
from estuary.state.base import Store
from estuary.state.errors import StoreError

__all__ = ["StoreWatch"]

log = logging.getLogger(__name__)

#: How long :meth:`StoreWatch.stop` waits for the thread beyond one probe's timeout.
_JOIN_SLACK_S = 1.0


class StoreWatch:
    """Probe a store every ``interval_s`` on a thread; report each change of health.

    Parameters
    ----------
    store
        The store to probe.
    interval_s
        Period between the starts of two probes, on ``clock`` (> 0).
    timeout_s
        How long one probe waits for the store (> 0): a real socket timeout.
    on_change
        Called with the new verdict (True: answers) after the first probe and after
        every probe whose verdict differs from the last; from the watcher's thread.
    on_probe
        Called after every probe with its round trip in seconds, or ``None`` when it
        failed (metrics); from the watcher's thread.
    clock
        The replica's clock, which the period is waited on.
    node
        The replica's name, for the thread's log context.
    """

    def __init__(
        self,
        store: Store,
        *,
        interval_s: float,
        timeout_s: float,
        on_change: Callable[[bool], None],
        on_probe: Callable[[float | None], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        node: str | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self._store = store
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._on_change = on_change
        self._on_probe = on_probe
        self._clock = clock
        self._node = node
        self._healthy: bool | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def healthy(self) -> bool | None:
        """The last verdict: True (answered), False (silent), None before the first probe."""
        return self._healthy

    def check(self) -> bool:
        """Probe the store once; report the verdict if it changed; return it."""
        # The round trip is a real duration of this machine's I/O (a metric of the store,
        # not of federation time), so perf_counter, not the injected clock, measures it.
        started = time.perf_counter()
        latency: float | None
        try:
            self._store.probe(timeout_s=self.timeout_s)
            latency = time.perf_counter() - started
        except StoreError as exc:
            latency = None
            if self._healthy is not False:
                log.warning("state store silent: %s", exc)
        except Exception:  # a bug must not stop the watcher; it cannot vouch for the store
            latency = None
            log.exception("store probe failed unexpectedly")
        healthy = latency is not None
        if self._on_probe is not None:
            try:
                self._on_probe(latency)
            except Exception:
                log.exception("recording the store probe failed")
        if healthy is not self._healthy:
            if healthy and self._healthy is False:
                log.warning("state store answers again")
            self._healthy = healthy
            try:
                self._on_change(healthy)
            except Exception:
                log.exception("reporting store health failed")
        return healthy

    def start(self) -> None:
        """Start probing on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("start: already started")
        self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with log_context(**({} if self._node is None else {"node": self._node})):
            while not self._stop.is_set():
                self.check()
                self._clock.wait(self._stop, self.interval_s)

    def stop(self) -> None:
        """Stop the thread; waits at most one probe's timeout (plus a little)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + _JOIN_SLACK_S)
            self._thread = None
