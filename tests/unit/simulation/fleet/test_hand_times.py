"""A one-class trace with no spread, where every virtual time is computed by hand."""

from __future__ import annotations

import pytest

from estuary.clock import VirtualClock
from simulation.fleet.engine import EventQueue
from simulation.fleet.policies import FedBuffPolicy, FleetEnv, SyncFedAvgPolicy


def test_event_queue_orders_by_time_then_insertion() -> None:
    q = EventQueue(VirtualClock())
    seen: list[tuple[str, float]] = []
    q.at(2.0, lambda: seen.append(("b", q.now)))
    q.at(1.0, lambda: seen.append(("a", q.now)))
    q.at(2.0, lambda: seen.append(("c", q.now)))
    q.at(1.0, lambda: q.after(0.5, lambda: seen.append(("d", q.now))))
    q.run(until=10.0, stop=lambda: False)
    assert seen == [("a", 1.0), ("d", 1.5), ("b", 2.0), ("c", 2.0)]
    assert q.now == 10.0
    with pytest.raises(ValueError, match="before now"):
        q.at(5.0, lambda: None)


def test_fedbuff_version_one_lands_when_the_third_upload_arrives(hand_env: FleetEnv) -> None:
    # A first task downloads the manifest, the adapter and the compressed base.
    s = hand_env.artifact_bytes["laptop"] + hand_env.base_bytes["laptop"]
    assert hand_env.base_bytes["laptop"] > 100_000 > hand_env.artifact_bytes["laptop"]
    p = hand_env.plain_bytes(2)
    assert p == sum(out * 2 * 4 for out, _ in hand_env.adapter0.shapes.values())
    # Task and artifact down (two latencies + S bytes at 1 MB/s), one step of 2 s,
    # then the plain ΔB up (latency + P bytes at 1 MB/s); all three devices alike.
    expected = 2 * 0.5 + s / 1e6 + 1 * 2.0 + 0.5 + p / 1e6
    rec = FedBuffPolicy(hand_env).run()
    t, updates, version, _bpb = rec.curve[1]
    assert version == 1 and updates == 3
    assert t == pytest.approx(expected, abs=1e-9)
    assert rec.bytes_down == 3 * s and rec.bytes_up == 3 * p
    assert rec.staleness.as_dict() == {0: 3}
    assert rec.wasted_fraction == 0.0
    assert rec.work_s == pytest.approx(3 * 2.0)


def test_sync_round_ends_after_the_last_report_and_unmasking(hand_env: FleetEnv) -> None:
    s = hand_env.artifact_bytes["laptop"] + hand_env.base_bytes["laptop"]
    # Task, keys and shares (four latencies) and the artifact, one 2 s step, the masked
    # input up (one latency), then consistency check and unmasking (four latencies).
    expected = 4 * 0.5 + s / 1e6 + 2.0 + 0.5 + 4 * 0.5
    rec = SyncFedAvgPolicy(hand_env).run()
    t, updates, version, bpb = rec.curve[1]
    assert (version, updates) == (1, 3)
    assert t == pytest.approx(expected, abs=1e-9)
    assert bpb < rec.curve[0][3]  # real training: the held-out loss moved down
    assert rec.discarded == 0 and rec.wasted_fraction == 0.0
