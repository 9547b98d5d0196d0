"""The store watcher and the store probe it relies on, against a real, frozen redis-server.

A SIGSTOPped redis-server is the hard case: the kernel still accepts connections, so
nothing fails until a reply is awaited. The store's own ``ping`` then waits attempts ×
socket timeout (3 × 5 s); the probe must give up after its own short timeout.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis_server import RedisServer

from coordinator.metrics import CoordinatorMetrics
from coordinator.store_watch import StoreWatch
from estuary.clock import VirtualClock
from estuary.state.errors import StoreUnavailable
from estuary.state.memory import MemoryStore
from estuary.state.redis_store import RedisStore

#: The probe timeout of these tests, and the slack allowed on top of it for a loaded
#: machine: a frozen store must be reported well before the store's own 15 s retry.
PROBE_S = 0.2
SLACK_S = 2.0


class SwitchStore(MemoryStore):
    """A MemoryStore whose ping can be switched to fail."""

    down = False

    def ping(self) -> None:
        if self.down:
            raise StoreUnavailable("test: store is down")
        super().ping()


def _watch(store: Any, **kwargs: Any) -> tuple[StoreWatch, list[bool], CoordinatorMetrics]:
    changes: list[bool] = []
    metrics = CoordinatorMetrics()
    watch = StoreWatch(
        store,
        interval_s=1.0,
        timeout_s=PROBE_S,
        on_change=changes.append,
        on_probe=metrics.store_probe,
        clock=VirtualClock(),
        **kwargs,
    )
    return watch, changes, metrics


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        StoreWatch(MemoryStore(), interval_s=0, timeout_s=1, on_change=print)
    with pytest.raises(ValueError, match="timeout_s"):
        StoreWatch(MemoryStore(), interval_s=1, timeout_s=0, on_change=print)
    with pytest.raises(ValueError, match="timeout_s"):
        MemoryStore().probe(timeout_s=0)


def test_verdicts_are_reported_once_per_change() -> None:
    store = SwitchStore()
    watch, changes, metrics = _watch(store)
    assert watch.healthy is None
    assert watch.check() and watch.check()
    store.down = True
    assert not watch.check() and not watch.check()
    store.down = False
    assert watch.check()
    assert changes == [True, False, True]
    assert metrics.value("estuary_store_up") == 1
    assert metrics.value("estuary_store_ping_seconds_count") == 3  # the answered probes


def test_a_failing_callback_does_not_stop_the_watcher() -> None:
    def broken(_: bool) -> None:
        raise RuntimeError("boom")

    watch = StoreWatch(SwitchStore(), interval_s=1, timeout_s=1, on_change=broken)
    assert watch.check()


def test_the_thread_probes_every_interval_until_stopped() -> None:
    store = SwitchStore()
    changes: list[bool] = []
    watch = StoreWatch(store, interval_s=0.01, timeout_s=PROBE_S, on_change=changes.append)
    watch.start()
    try:
        deadline = time.monotonic() + SLACK_S
        while changes != [True] and time.monotonic() < deadline:
            time.sleep(0.005)
        store.down = True
        while changes != [True, False] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert changes == [True, False]
    finally:
        watch.stop()


@pytest.mark.redis
def test_a_frozen_redis_is_reported_within_the_probe_timeout(
    own_redis_server: RedisServer,
) -> None:
    store = RedisStore(port=own_redis_server.port)  # production timeouts: 5 s × 3 tries
    watch, changes, metrics = _watch(store, node="test")
    try:
        assert watch.check()
        own_redis_server.pause()
        try:
            started = time.monotonic()
            assert not watch.check()
            assert time.monotonic() - started < PROBE_S + SLACK_S
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no answer within 0.2 s"):
                store.probe(timeout_s=PROBE_S)  # also on a fresh connection
            assert time.monotonic() - started < PROBE_S + SLACK_S
        finally:
            own_redis_server.resume()
        assert watch.check()
        assert changes == [True, False, True]
        assert metrics.value("estuary_store_up") == 1
        own_redis_server.kill()
        started = time.monotonic()
        assert not watch.check()  # refused at once: nothing listens
        assert time.monotonic() - started < PROBE_S + SLACK_S
        own_redis_server.start()
        assert watch.check()  # the probe reconnects
        store.put("k", b"v")  # and the store's own pool serves again
        assert changes == [True, False, True, False, True]
    finally:
        store.close()
