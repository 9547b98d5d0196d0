"""The store contract: every guarantee of ``estuary.state.base.Store``, on every backend.

Each test runs against MemoryStore and RedisStore (``backend`` fixture);
tests that need a Redis process (kill -9, outages, other processes) take
their own server. MemoryStore lives inside one process by design, so its
"concurrent clients" are threads sharing one instance.
"""

from __future__ import annotations

import json
import logging
import math
import runpy
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer, ServerTLS

from estuary.state import (
    FencingError,
    LeaseLost,
    MemoryStore,
    Record,
    Store,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    open_store,
)

if TYPE_CHECKING:  # the fixture's type; conftest modules are not imported by name
    from conftest import Backend

WORKER = Path(__file__).with_name("cas_worker.py")


# ---------------------------------------------------------------------- records


def test_put_get_and_versions(store: Store) -> None:
    assert store.get("k") is None
    assert store.put("k", b"one") == 1
    assert store.put("k", b"two") == 2
    record = store.get("k")
    assert record is not None
    assert (record.value, record.version) == (b"two", 2)
    assert store.put("empty", b"") == 1
    empty = store.get("empty")
    assert empty is not None and empty.value == b""


def test_compare_and_set(store: Store) -> None:
    assert store.compare_and_set("k", b"a", expected_version=0) == 1
    with pytest.raises(VersionConflict) as info:
        store.compare_and_set("k", b"b", expected_version=0)
    assert (info.value.key, info.value.expected, info.value.actual) == ("k", 0, 1)
    assert "'k'" in str(info.value)
    assert store.compare_and_set("k", b"c", expected_version=1) == 2
    with pytest.raises(VersionConflict) as info:
        store.compare_and_set("k", b"d", expected_version=1)
    assert info.value.actual == 2
    with pytest.raises(VersionConflict) as info:
        store.compare_and_set("missing", b"x", expected_version=3)
    assert info.value.actual == 0
    assert store.get("missing") is None
    assert store.get("k") is not None and store.get("k").value == b"c"  # type: ignore[union-attr]


def test_insert_if_absent(store: Store) -> None:
    assert store.insert_if_absent("id", b"first") is True
    assert store.insert_if_absent("id", b"second") is False
    record = store.get("id")
    assert record is not None and (record.value, record.version) == (b"first", 1)


def test_delete(store: Store) -> None:
    assert store.delete("k") is False
    store.put("k", b"a")
    store.put("k", b"b")
    with pytest.raises(VersionConflict) as info:
        store.delete("k", expected_version=1)
    assert info.value.actual == 2
    assert store.get("k") is not None
    assert store.delete("k", expected_version=2) is True
    assert store.get("k") is None
    with pytest.raises(VersionConflict):
        store.delete("k", expected_version=1)
    assert store.put("k", b"again") == 1  # a deleted record starts over
    assert store.delete("k") is True


def test_scan_prefix_is_literal(store: Store) -> None:
    keys = ["run:1", "run:2", "run:10", "runner", "x*[?]\\", "x*y", "xa", "é:1"]
    for i, key in enumerate(keys):
        store.put(key, str(i).encode())
    store.put("run:2", b"updated")
    got = store.scan("run:")
    assert set(got) == {"run:1", "run:2", "run:10"}
    assert got["run:2"].value == b"updated" and got["run:2"].version == 2
    assert set(store.scan("x*")) == {"x*[?]\\", "x*y"}
    assert set(store.scan("x*[?]")) == {"x*[?]\\"}
    assert set(store.scan("é")) == {"é:1"}
    assert set(store.scan("")) == set(keys)
    assert store.scan("nothing") == {}


def test_invalid_arguments_raise_value_error(store: Store) -> None:
    with pytest.raises(ValueError, match="key"):
        store.put("", b"x")
    with pytest.raises(ValueError, match="value"):
        store.put("k", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected_version"):
        store.compare_and_set("k", b"x", expected_version=-1)
    with pytest.raises(ValueError, match="min_score"):
        store.zrange_by_score("z", min_score=math.nan, max_score=1)
    with pytest.raises(ValueError, match="ttl_s"):
        store.acquire_lease("l", holder="h", ttl_s=0)
    with pytest.raises(ValueError, match="ids"):
        store.ack("s", "g", "not-an-id")


def test_compare_and_set_race_between_threads(backend: Backend) -> None:
    """Threads (the only form of concurrency a MemoryStore has) racing on CAS."""
    setup = backend.open()
    rounds, increments, racers = 100, 50, 4
    for i in range(rounds):
        setup.put(f"race:{i}", b"initial")
    setup.put("counter", b"0")
    race = runpy.run_path(str(WORKER))["race"]
    clients = [backend.open() for _ in range(racers)]
    with ThreadPoolExecutor(racers) as pool:
        futures = [
            pool.submit(race, c, tag=f"t{n}", rounds=rounds, increments=increments)
            for n, c in enumerate(clients)
        ]
        while any(setup.get(f"ready:t{n}") is None for n in range(racers)):
            time.sleep(0.001)
        setup.put("go", b"1")
        results = [f.result(timeout=60) for f in futures]
    _assert_race_outcome(setup, results, rounds=rounds, increments=increments, racers=racers)


@pytest.mark.redis
def test_compare_and_set_race_between_processes(redis_server: RedisServer) -> None:
    """Two OS processes racing through Redis: exactly one wins each round, no lost update."""
    prefix = f"race-{time.time_ns()}:"
    setup = open_store(redis_server.url, prefix=prefix)
    rounds, increments, racers = 300, 150, 2
    for i in range(rounds):
        setup.put(f"race:{i}", b"initial")
    setup.put("counter", b"0")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), redis_server.url, prefix, f"p{n}", str(rounds),
             str(increments)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(racers)
    ]  # fmt: skip
    # Start the race only once both processes have imported, connected and
    # announced themselves, so that they really run at the same time.
    deadline = time.monotonic() + 30
    while any(setup.get(f"ready:p{n}") is None for n in range(racers)):
        assert time.monotonic() < deadline, "racer processes did not start"
        time.sleep(0.01)
    setup.put("go", b"1")
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        results.append(json.loads(out))
    _assert_race_outcome(setup, results, rounds=rounds, increments=increments, racers=racers)


def _assert_race_outcome(
    store: Store, results: list[dict[str, Any]], *, rounds: int, increments: int, racers: int
) -> None:
    wins = Counter(i for r in results for i in r["wins"])
    assert sorted(wins) == list(range(rounds)), "every round has a winner"
    assert set(wins.values()) == {1}, "no round has two winners"
    for i in range(rounds):
        record = store.get(f"race:{i}")
        assert record is not None and record.version == 2
        winner = next(n for n, r in enumerate(results) if i in r["wins"])
        assert record.value.decode()[1:] == str(winner)
    counter = store.get("counter")
    assert counter is not None
    print(f"contention: round wins {[len(r['wins']) for r in results]}, "
          f"increment conflicts {[r['conflicts'] for r in results]}")  # fmt: skip
    assert int(counter.value) == increments * racers, "no increment was lost"
    assert counter.version == increments * racers + 1


def test_insert_if_absent_under_concurrency(backend: Backend) -> None:
    keys, racers = 60, 6
    clients = [backend.open() for _ in range(racers)]
    barrier = threading.Barrier(racers)

    def insert_all(n: int) -> list[int]:
        barrier.wait()
        return [k for k in range(keys) if clients[n].insert_if_absent(f"id:{k}", f"{n}".encode())]

    with ThreadPoolExecutor(racers) as pool:
        won = list(pool.map(insert_all, range(racers)))
    winners = Counter(k for w in won for k in w)
    assert sorted(winners) == list(range(keys)) and set(winners.values()) == {1}
    for k in range(keys):
        record = clients[0].get(f"id:{k}")
        owner = next(n for n, w in enumerate(won) if k in w)
        assert record is not None and record.value == str(owner).encode()
        assert record.version == 1


# ---------------------------------------------------------------------- leases


def test_lease_is_exclusive_and_tokens_increase(store: Store) -> None:
    first = store.acquire_lease("agg", holder="a", ttl_s=30)
    assert first is not None and first.holder == "a" and first.name == "agg"
    assert store.acquire_lease("agg", holder="b", ttl_s=30) is None
    assert store.acquire_lease("agg", holder="a", ttl_s=30) is None  # renew, not re-acquire
    store.release_lease(first)
    second = store.acquire_lease("agg", holder="b", ttl_s=30)
    assert second is not None and second.token > first.token
    store.release_lease(first)  # stale release must not drop b's lease
    assert store.acquire_lease("agg", holder="c", ttl_s=30) is None
    assert store.fenced_put("k", b"b", lease=second) == 1
    other = store.acquire_lease("other", holder="a", ttl_s=30)
    assert other is not None  # leases of different names are independent


def test_lost_lease_write_rejected_by_fencing_token(store: Store) -> None:
    old = store.acquire_lease("agg", holder="a", ttl_s=0.3)
    assert old is not None
    assert store.fenced_put("version", b"from a", lease=old) == 1
    time.sleep(0.45)  # a stalls (GC pause, partition) past its TTL
    new = store.acquire_lease("agg", holder="b", ttl_s=30)
    assert new is not None and new.token > old.token
    with pytest.raises(FencingError) as info:
        store.fenced_put("version", b"late write from a", lease=old)
    assert info.value.token == old.token and "superseded" in info.value.reason
    with pytest.raises(FencingError):
        store.fenced_compare_and_set("version", b"late cas from a", lease=old, expected_version=1)
    with pytest.raises(LeaseLost):
        store.renew_lease(old, ttl_s=30)
    assert store.fenced_compare_and_set("version", b"from b", lease=new, expected_version=1) == 2
    record = store.get("version")
    assert record is not None and record.value == b"from b"


def test_expired_lease_write_rejected_without_new_holder(store: Store) -> None:
    lease = store.acquire_lease("agg", holder="a", ttl_s=0.2)
    assert lease is not None
    time.sleep(0.3)
    with pytest.raises(FencingError) as info:
        store.fenced_put("k", b"x", lease=lease)
    assert "expired" in info.value.reason
    assert store.get("k") is None
    store.release_lease(lease)
    with pytest.raises(LeaseLost):
        store.renew_lease(lease, ttl_s=1)
    again = store.acquire_lease("agg", holder="a", ttl_s=5)
    assert again is not None and again.token > lease.token


def test_renew_keeps_the_lease_alive(store: Store) -> None:
    lease = store.acquire_lease("agg", holder="a", ttl_s=1.0)
    assert lease is not None
    time.sleep(0.3)
    renewed = store.renew_lease(lease, ttl_s=5)
    assert renewed.token == lease.token and renewed.expires_at > lease.expires_at
    time.sleep(0.8)  # past the original expiry
    assert store.fenced_put("k", b"ok", lease=renewed) == 1
    assert store.fenced_put("k", b"ok", lease=lease) == 2  # same token, same lease
    assert store.acquire_lease("agg", holder="b", ttl_s=5) is None


def test_fenced_compare_and_set_checks_version_after_fence(store: Store) -> None:
    lease = store.acquire_lease("agg", holder="a", ttl_s=30)
    assert lease is not None
    assert store.fenced_compare_and_set("k", b"1", lease=lease, expected_version=0) == 1
    with pytest.raises(VersionConflict) as info:
        store.fenced_compare_and_set("k", b"2", lease=lease, expected_version=0)
    assert info.value.actual == 1


# ---------------------------------------------------------------------- sorted sets


def test_get_many_returns_each_record_in_order(store: Store) -> None:
    store.put("a", b"1")
    store.put("a", b"2")
    store.put("c", b"3")
    assert store.get_many(["c", "missing", "a", "c"]) == [
        Record(b"3", 1),
        None,
        Record(b"2", 2),
        Record(b"3", 1),
    ]
    assert store.get_many([]) == []
    with pytest.raises(ValueError, match="keys"):
        store.get_many("a")
    with pytest.raises(ValueError, match="keys"):
        store.get_many(["a", ""])


def test_zadd_pruned_prunes_then_adds_then_reads(store: Store) -> None:
    store.zadd("nonces", {"old": 1.0, "edge": 2.0, "young": 3.0})
    store.put("epoch", b"")
    added, records = store.zadd_pruned(
        "nonces", {"young": 4.0, "new": 5.0}, prune_max_score=2.0, read=["epoch", "none"]
    )
    assert added == 1  # "young" was there already; "old" and "edge" were pruned first
    assert records == [Record(b"", 1), None]
    assert store.zrange_by_score("nonces", min_score=-math.inf, max_score=math.inf) == [
        ("young", 4.0),
        ("new", 5.0),
    ]
    again, nothing = store.zadd_pruned("nonces", {"new": 6.0}, prune_max_score=0.0)
    assert (again, nothing) == (0, [])
    # A member at or below the prune bound is pruned first, so it counts as new.
    assert store.zadd_pruned("nonces", {"young": 4.0}, prune_max_score=4.0)[0] == 1
    with pytest.raises(ValueError, match="members"):
        store.zadd_pruned("nonces", {}, prune_max_score=0.0)
    with pytest.raises(ValueError, match="prune_max_score"):
        store.zadd_pruned("nonces", {"m": 1.0}, prune_max_score=math.nan)
    with pytest.raises(ValueError, match="read"):
        store.zadd_pruned("nonces", {"m": 1.0}, prune_max_score=0.0, read="epoch")


def test_zmax_many_reads_each_sets_highest_score(store: Store) -> None:
    store.zadd("seen-a", {"n1": 5.0, "n2": 7.5, "n3": -1.0})
    store.zadd("seen-b", {"only": 2.0})
    store.zadd("seen-c", {"gone": 1.0})
    store.zrem("seen-c", "gone")
    assert store.zmax_many(["seen-a", "missing", "seen-b", "seen-c"]) == [7.5, None, 2.0, None]
    store.zadd("seen-a", {"n1": 9.25})  # a member's score raised
    assert store.zmax_many(["seen-a"]) == [9.25]
    assert store.zmax_many([]) == []
    with pytest.raises(ValueError, match="names"):
        store.zmax_many("seen-a")


def test_sorted_set_ordering(store: Store) -> None:
    assert store.zadd("pace", {"b": 2.0, "a": 2.0, "c": 1.5, "é": 2.0, "z": -math.inf}) == 5
    assert store.zadd("pace", {"c": 3.0, "d": 0.25}) == 1  # c is updated, not new
    assert store.zcard("pace") == 6
    everything = store.zrange_by_score("pace", min_score=-math.inf, max_score=math.inf)
    assert everything == [
        ("z", -math.inf), ("d", 0.25), ("a", 2.0), ("b", 2.0), ("é", 2.0), ("c", 3.0)
    ]  # fmt: skip
    assert store.zrange_by_score("pace", min_score=0.25, max_score=2.0) == [
        ("d", 0.25), ("a", 2.0), ("b", 2.0), ("é", 2.0)
    ]  # fmt: skip
    assert store.zrange_by_score("pace", min_score=0, max_score=10, limit=2) == [
        ("d", 0.25), ("a", 2.0)
    ]  # fmt: skip
    assert store.zrange_by_score("pace", min_score=0, max_score=10, limit=0) == []
    assert store.zcount("pace", min_score=0.25, max_score=2.0) == 4
    assert store.zcount("pace", min_score=-math.inf, max_score=math.inf) == 6
    assert store.zcount("pace", min_score=math.nextafter(2.0, math.inf), max_score=math.inf) == 1
    assert store.zcount("pace", min_score=5, max_score=1) == 0
    assert store.zcount("nothing", min_score=-math.inf, max_score=math.inf) == 0
    assert store.zrem("pace", "a", "missing") == 1
    assert store.zcard("pace") == 5
    assert store.zcard("nothing") == 0
    precise = 1234567890.123456789
    store.zadd("precise", {"m": precise})
    assert store.zrange_by_score("precise", min_score=precise, max_score=precise) == [
        ("m", precise)
    ]


# ---------------------------------------------------------------------- job streams


def _fields(n: int) -> dict[str, bytes]:
    return {"job": f"eval-{n}".encode(), "version": str(n).encode()}


def test_stream_delivers_each_new_job_to_one_consumer(store: Store) -> None:
    ids = [store.stream_add("jobs", _fields(n)) for n in range(5)]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert len(set(ids)) == 5
    assert store.stream_length("jobs") == 5
    store.ensure_group("jobs", "workers")
    store.ensure_group("jobs", "workers")  # idempotent; must not reset the group
    first = store.read_group("jobs", "workers", "w1", count=3)
    second = store.read_group("jobs", "workers", "w2", count=10)
    assert [j.id for j in first] == ids[:3] and [j.id for j in second] == ids[3:]
    assert first[0].fields == _fields(0) and first[0].deliveries == 1
    assert first[0].stream == "jobs"
    store.ensure_group("jobs", "workers")
    assert store.read_group("jobs", "workers", "w1", count=10) == []
    pending = store.pending("jobs", "workers")
    assert [(p.id, p.consumer, p.deliveries) for p in pending] == [
        (i, "w1" if n < 3 else "w2", 1) for n, i in enumerate(ids)
    ]
    assert all(0 <= p.idle_s < 5 for p in pending)
    assert store.ack("jobs", "workers", ids[0], ids[1]) == 2
    assert store.ack("jobs", "workers", ids[0]) == 0  # acknowledged once only
    assert [p.id for p in store.pending("jobs", "workers")] == ids[2:]
    store.ensure_group("jobs", "auditors")  # a second group sees every job again
    assert len(store.read_group("jobs", "auditors", "a", count=10)) == 5
    assert store.stream_length("nothing") == 0


def test_stream_group_errors(store: Store) -> None:
    store.stream_add("jobs", _fields(0))
    with pytest.raises(StoreError):
        store.read_group("jobs", "nogroup", "w", count=1)
    with pytest.raises(StoreError):
        store.pending("jobs", "nogroup")
    with pytest.raises(StoreError):
        store.reclaim("jobs", "nogroup", "w", min_idle_s=0, count=1)
    store.ensure_group("fresh", "g")  # creates the stream too
    assert store.stream_length("fresh") == 0
    assert store.read_group("fresh", "g", "w", count=1) == []


def test_read_group_blocks_until_a_job_arrives(backend: Backend) -> None:
    reader, writer = backend.open(), backend.open()
    reader.ensure_group("jobs", "g")
    start = time.monotonic()
    assert reader.read_group("jobs", "g", "w", count=1, block_s=0.3) == []
    assert 0.25 <= time.monotonic() - start < 3
    timer = threading.Timer(0.2, lambda: writer.stream_add("jobs", _fields(1)))
    timer.start()
    start = time.monotonic()
    jobs = reader.read_group("jobs", "g", "w", count=1, block_s=5)
    elapsed = time.monotonic() - start
    timer.join()
    assert [j.fields for j in jobs] == [_fields(1)]
    assert 0.1 <= elapsed < 3


def test_job_of_dead_consumer_is_reclaimed_and_acked_once(backend: Backend) -> None:
    live = backend.open()
    ids = [live.stream_add("jobs", _fields(n)) for n in range(3)]
    live.ensure_group("jobs", "g")
    dead = backend.open()
    taken = dead.read_group("jobs", "g", "dying", count=3)
    assert [j.id for j in taken] == ids
    dead.ack("jobs", "g", ids[0])
    dead.close()  # the consumer dies holding ids[1] and ids[2]
    # Margins of ~1 s so that a stalled CI runner cannot make "not idle yet" false.
    assert live.reclaim("jobs", "g", "rescuer", min_idle_s=1.0, count=10) == []  # not idle yet
    time.sleep(1.1)
    reclaimed = live.reclaim("jobs", "g", "rescuer", min_idle_s=1.0, count=10)
    assert [j.id for j in reclaimed] == ids[1:]
    assert [j.fields for j in reclaimed] == [_fields(1), _fields(2)]
    assert [j.deliveries for j in reclaimed] == [2, 2]
    pending = live.pending("jobs", "g")
    assert [(p.consumer, p.deliveries) for p in pending] == [("rescuer", 2), ("rescuer", 2)]
    assert all(p.idle_s < 1.0 for p in pending), "reclaiming restarts the idle time"
    # A second rescuer racing right after finds nothing idle: no double delivery.
    assert live.reclaim("jobs", "g", "other", min_idle_s=1.0, count=10) == []
    assert live.ack("jobs", "g", *ids[1:]) == 2
    assert live.ack("jobs", "g", *ids) == 0
    assert live.pending("jobs", "g") == []
    assert live.reclaim("jobs", "g", "other", min_idle_s=0, count=10) == []  # nothing left


def test_reclaim_respects_count(store: Store) -> None:
    for n in range(5):
        store.stream_add("jobs", _fields(n))
    store.ensure_group("jobs", "g")
    store.read_group("jobs", "g", "dead", count=5)
    first = store.reclaim("jobs", "g", "r1", min_idle_s=0, count=2)
    assert len(first) == 2
    consumers = Counter(p.consumer for p in store.pending("jobs", "g"))
    assert consumers == {"r1": 2, "dead": 3}


# ---------------------------------------------------------------------- Redis process faults


@pytest.mark.redis
def test_acknowledged_writes_survive_kill_9(own_redis_server: RedisServer) -> None:
    store = open_store(own_redis_server.url, prefix="durable:")
    store.put("k", b"v1")
    store.put("k", b"v2")
    assert store.insert_if_absent("idem", b"x")
    store.zadd("pace", {"a": 1.0, "b": 2.0})
    ids = [store.stream_add("jobs", _fields(n)) for n in range(3)]
    store.ensure_group("jobs", "g")
    store.read_group("jobs", "g", "w", count=3)
    store.ack("jobs", "g", ids[0])
    lease = store.acquire_lease("agg", holder="a", ttl_s=60)
    assert lease is not None
    store.release_lease(lease)

    own_redis_server.restart()  # SIGKILL: no shutdown, no final fsync

    # The same client carries on: its pooled connections are replaced.
    record = store.get("k")
    assert record is not None and (record.value, record.version) == (b"v2", 2)
    assert store.insert_if_absent("idem", b"y") is False
    assert store.zrange_by_score("pace", min_score=0, max_score=5) == [("a", 1.0), ("b", 2.0)]
    assert [p.id for p in store.pending("jobs", "g")] == ids[1:]
    after = store.acquire_lease("agg", holder="b", ttl_s=60)
    assert after is not None and after.token > lease.token, "fencing tokens survive restarts"
    store.close()


@pytest.mark.redis
def test_redis_down_raises_store_unavailable_quickly(
    own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(own_redis_server.url, prefix="down:", password="s3cret-pw")
    assert "s3cret-pw" not in store.url and "***" in store.url
    own_redis_server.kill()
    caplog.set_level(logging.WARNING, logger="estuary.state.redis_store")
    for call in (store.ping, lambda: store.get("k"), lambda: store.put("k", b"v")):
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            call()
        # Default policy: 3 attempts, refused at once, backoff 0.2 s + 0.4 s.
        assert time.monotonic() - start < 3
        assert info.value.outcome_unknown is False  # nothing was sent
    retries = [r for r in caplog.records if "attempt 1 of 3" in r.getMessage()]
    assert len(retries) >= 3
    assert all("s3cret-pw" not in r.getMessage() for r in caplog.records)
    own_redis_server.start()
    # Wrong credentials are a configuration error, reported at once, not an outage.
    with pytest.raises(StoreError) as auth:
        store.ping()
    assert not isinstance(auth.value, StoreUnavailable)
    assert "s3cret-pw" not in str(auth.value)


@pytest.mark.redis
def test_client_recovers_when_redis_comes_back(own_redis_server: RedisServer) -> None:
    store = open_store(own_redis_server.url, prefix="back:")
    store.put("k", b"v")
    own_redis_server.kill()
    with pytest.raises(StoreUnavailable):
        store.get("k")
    own_redis_server.start()
    record = store.get("k")  # same client, new connections
    assert record is not None and record.value == b"v"


@pytest.mark.redis
def test_unresponsive_server_never_hangs() -> None:
    """A peer that accepts connections but never answers (hung server, black hole)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes handshakes; nobody ever replies
        port = listener.getsockname()[1]
        store = open_store(
            f"redis://127.0.0.1:{port}/0",
            socket_timeout_s=0.3,
            socket_connect_timeout_s=0.3,
            attempts=2,
            backoff_s=0.05,
        )
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            store.get("k")
        assert time.monotonic() - start < 3
        assert info.value.outcome_unknown is False
        with pytest.raises(StoreUnavailable) as info:
            store.put("k", b"v")
        # The connection handshake timed out: the write was never sent.
        assert info.value.outcome_unknown is False
        store.close()


@pytest.mark.redis
def test_write_interrupted_after_sending_is_not_repeated(own_redis_server: RedisServer) -> None:
    store = open_store(
        own_redis_server.url, prefix="hang:", socket_timeout_s=0.3, attempts=3, backoff_s=0.05
    )
    store.put("warm-up", b"")  # an open pooled connection and a cached script, as in steady state
    own_redis_server.pause()  # SIGSTOP: the server hangs mid-conversation
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            store.put("k", b"v")
        elapsed = time.monotonic() - start
        assert info.value.outcome_unknown is True
        assert elapsed < 0.3 * 2, "one timeout, no retry of a write that may have landed"
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get("k")  # reads are retried, and still bounded
        assert time.monotonic() - start < 3
    finally:
        own_redis_server.resume()
    # The server had received the write: it lands once resumed. Retrying it
    # blindly would have made it version 2.
    deadline = time.monotonic() + 5
    while (record := store.get("k")) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert record is not None and record.version == 1


@pytest.mark.redis
def test_zadd_pruned_interrupted_after_sending_is_not_repeated(
    own_redis_server: RedisServer,
) -> None:
    store = open_store(
        own_redis_server.url, prefix="hang:", socket_timeout_s=0.3, attempts=3, backoff_s=0.05
    )
    store.zadd("nonces", {"warm-up": 0.0})  # an open pooled connection, as in steady state
    own_redis_server.pause()
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.zadd_pruned("nonces", {"n1": 5.0}, prune_max_score=1.0, read=["k"])
        assert info.value.outcome_unknown is True
    finally:
        own_redis_server.resume()
    # Landed once: a blind repeat would have reported n1 as already there (a false replay).
    deadline = time.monotonic() + 5
    while store.zcard("nonces") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.zrange_by_score("nonces", min_score=-math.inf, max_score=math.inf) == [("n1", 5.0)]


# ---------------------------------------------------------------------- model-based


_KEYS = st.sampled_from(["a", "ab", "b", "b:1"])
_MEMBERS = st.sampled_from(["m1", "m2", "n", "é"])
_SCORES = st.sampled_from([-1.0, 0.0, 0.5, 2.0, math.inf])
_OPS = st.one_of(
    st.tuples(st.just("get"), _KEYS),
    st.tuples(st.just("put"), _KEYS, st.binary(max_size=4)),
    st.tuples(st.just("cas"), _KEYS, st.binary(max_size=4), st.integers(0, 3)),
    st.tuples(st.just("insert"), _KEYS, st.binary(max_size=4)),
    st.tuples(st.just("delete"), _KEYS, st.one_of(st.none(), st.integers(1, 3))),
    st.tuples(st.just("scan"), st.sampled_from(["", "a", "b:", "z"])),
    st.tuples(st.just("zadd"), st.dictionaries(_MEMBERS, _SCORES, min_size=1, max_size=3)),
    st.tuples(st.just("zrange"), _SCORES, _SCORES, st.one_of(st.none(), st.integers(0, 3))),
    st.tuples(st.just("zrem"), st.lists(_MEMBERS, min_size=1, max_size=2)),
    st.tuples(st.just("zcard")),
    st.tuples(st.just("get_many"), st.lists(_KEYS, max_size=3)),
    st.tuples(
        st.just("zadd_pruned"),
        st.dictionaries(_MEMBERS, _SCORES, min_size=1, max_size=3),
        _SCORES,
        st.lists(_KEYS, max_size=2),
    ),
    st.tuples(st.just("acquire"), st.sampled_from(["l1", "l2"])),
    st.tuples(st.just("release"), st.integers(0, 5)),
    st.tuples(st.just("fenced"), _KEYS, st.integers(0, 5)),
)


def _apply(store: Store, leases: list[Any], op: tuple[Any, ...]) -> Any:
    """Run one operation; return what a client could observe (value or error)."""
    kind, *args = op
    actions: dict[str, Callable[[], Any]] = {
        "get": lambda: store.get(args[0]),
        "put": lambda: store.put(args[0], args[1]),
        "cas": lambda: store.compare_and_set(args[0], args[1], expected_version=args[2]),
        "insert": lambda: store.insert_if_absent(args[0], args[1]),
        "delete": lambda: store.delete(args[0], expected_version=args[1]),
        "scan": lambda: store.scan(args[0]),
        "zadd": lambda: store.zadd("z", args[0]),
        "zrange": lambda: store.zrange_by_score(
            "z", min_score=args[0], max_score=args[1], limit=args[2]
        ),
        "zrem": lambda: store.zrem("z", *args[0]),
        "zcard": lambda: store.zcard("z"),
        "get_many": lambda: store.get_many(args[0]),
        "zadd_pruned": lambda: store.zadd_pruned(
            "z", args[0], prune_max_score=args[1], read=args[2]
        ),
    }
    try:
        if kind == "acquire":
            lease = store.acquire_lease(args[0], holder="h", ttl_s=60)
            if lease is not None:
                leases.append(lease)
            return None if lease is None else (lease.name, lease.token)
        if kind == "release":
            if leases:
                store.release_lease(leases[args[0] % len(leases)])
            return None
        if kind == "fenced":
            if not leases:
                return None
            return store.fenced_put(args[0], b"f", lease=leases[args[1] % len(leases)])
        return actions[kind]()
    except VersionConflict as exc:
        return ("VersionConflict", exc.key, exc.expected, exc.actual)
    except FencingError as exc:
        return ("FencingError", exc.token)


@pytest.mark.redis
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_OPS, max_size=30))
def test_memory_and_redis_agree_on_random_operation_sequences(
    redis_server: RedisServer, ops: list[tuple[Any, ...]]
) -> None:
    memory = MemoryStore()
    redis_store = open_store(redis_server.url, prefix=f"model-{time.time_ns()}:")
    try:
        memory_leases: list[Any] = []
        redis_leases: list[Any] = []
        for step, op in enumerate(ops):
            expected = _apply(memory, memory_leases, op)
            actual = _apply(redis_store, redis_leases, op)
            assert actual == expected, f"step {step}: {op}"
    finally:
        redis_store.close()


# ---------------------------------------------------------------------- TLS


def _write_ca_and_server_cert(directory: Path, *, name: str) -> tuple[Path, Path, Path]:
    """Write a throwaway CA and a server certificate for 127.0.0.1; return ca, cert, key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = (directory / f"{name}-{n}.pem" for n in ("ca", "cert", "key"))
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


@pytest.mark.redis
def test_rediss_verifies_the_server_certificate(redis_binary: str, tmp_path: Path) -> None:
    ca, cert, key = _write_ca_and_server_cert(tmp_path / "pki", name="good")
    other_ca, _, _ = _write_ca_and_server_cert(tmp_path / "pki", name="other")
    server = RedisServer(
        tmp_path / "redis", binary=redis_binary, tls=ServerTLS(cert_file=cert, key_file=key,
                                                               ca_file=ca)
    )  # fmt: skip
    with server:
        assert server.url.startswith("rediss://")
        store = open_store(f"{server.url}?ssl_ca_certs={ca}", prefix="tls:")
        assert store.put("k", b"over tls") == 1
        record = store.get("k")
        assert record is not None and record.value == b"over tls"
        store.close()
        # A server whose certificate the configured CA did not sign is refused.
        impostor = open_store(server.url, ssl_ca_certs=str(other_ca), attempts=1)
        with pytest.raises(StoreError, match="(?i)certificate"):
            impostor.ping()
        # Plain TCP to a TLS port never gets an answer it can use, and does not hang.
        plain = open_store(
            server.url.replace("rediss://", "redis://"), attempts=1, socket_timeout_s=0.5
        )
        start = time.monotonic()
        with pytest.raises(StoreError):
            plain.ping()
        assert time.monotonic() - start < 3


def test_reclaim_from_named_consumers_leaves_live_ones_alone(store: Store) -> None:
    for n in range(4):
        store.stream_add("jobs", _fields(n))
    store.ensure_group("jobs", "g")
    dead_jobs = store.read_group("jobs", "g", "dead", count=2)
    store.read_group("jobs", "g", "slow-but-alive", count=2)
    taken = store.reclaim("jobs", "g", "rescuer", min_idle_s=0, count=10, from_consumers={"dead"})
    assert [j.id for j in taken] == [j.id for j in dead_jobs]
    assert [j.deliveries for j in taken] == [2, 2]
    consumers = Counter(p.consumer for p in store.pending("jobs", "g"))
    assert consumers == {"rescuer": 2, "slow-but-alive": 2}
    with pytest.raises(ValueError, match="from_consumers"):
        store.reclaim("jobs", "g", "r", min_idle_s=0, count=1, from_consumers={""})


def test_update_reads_modifies_and_writes_under_contention(backend: Backend) -> None:
    first, second = backend.open(), backend.open()
    assert first.update("n", lambda cur: b"1" if cur is None else None) == b"1"
    assert first.update("n", lambda cur: None) is None  # no change: nothing written
    calls = 0

    def bump_with_interference(cur: bytes | None) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:  # another client writes between our read and our write
            second.put("n", b"10")
        return str(int(cur or b"0") + 1).encode()

    assert first.update("n", bump_with_interference) == b"11"
    assert calls == 2
    with pytest.raises(StoreError, match="still contended"):
        first.update("n", lambda cur: second.put("n", b"x") and b"y", attempts=3)
