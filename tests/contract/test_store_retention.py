"""Retention primitives of the store contract: trimming a job stream, sizing the store.

Run against the memory store and a real redis-server (one suite, both backends).
"""

from __future__ import annotations

from estuary.state import Store


def _add(store: Store, n: int) -> list[str]:
    return [store.stream_add("jobs", {"job": str(i).encode()}) for i in range(n)]


def test_trim_removes_only_entries_delivered_and_acknowledged(store: Store) -> None:
    store.ensure_group("jobs", "workers")
    ids = _add(store, 6)
    jobs = store.read_group("jobs", "workers", "w1", count=4)  # 0..3 delivered
    assert [j.id for j in jobs] == ids[:4]
    store.ack("jobs", "workers", ids[0], ids[1], ids[3])  # 2 still pending
    assert store.trim_stream("jobs", "workers") == 2  # 0 and 1; 2 pending, 3 after it
    assert store.stream_length("jobs") == 4
    # The pending job can still be reclaimed and acknowledged; nothing undelivered is lost.
    again = store.reclaim("jobs", "workers", "w2", min_idle_s=0.0, count=10)
    assert [j.id for j in again] == [ids[2]]
    assert store.ack("jobs", "workers", ids[2]) == 1
    rest = store.read_group("jobs", "workers", "w1", count=10)
    assert [j.id for j in rest] == ids[4:]
    assert store.trim_stream("jobs", "workers") == 2  # 2 and 3; 4 and 5 are pending
    store.ack("jobs", "workers", *ids[4:])
    assert store.trim_stream("jobs", "workers") == 2
    assert store.stream_length("jobs") == 0
    new = _add(store, 1)  # the group carries on after a full trim
    assert [j.id for j in store.read_group("jobs", "workers", "w1", count=5)] == new


def test_trim_keeps_undelivered_entries_and_ignores_unknown_names(store: Store) -> None:
    assert store.trim_stream("nothing", "workers") == 0
    _add(store, 3)
    assert store.trim_stream("jobs", "workers") == 0  # no group: nothing is known done
    store.ensure_group("jobs", "workers")
    assert store.trim_stream("jobs", "workers") == 0
    assert store.trim_stream("jobs", "other") == 0
    assert store.stream_length("jobs") == 3


def test_footprint_counts_keys_and_grows_with_data(store: Store) -> None:
    before = store.footprint()
    store.put("a/1", b"x" * 10_000)
    store.zadd("z", {"m": 1.0})
    _add(store, 1)
    after = store.footprint()
    assert after.keys >= before.keys + 3
    assert after.bytes > before.bytes >= 0
