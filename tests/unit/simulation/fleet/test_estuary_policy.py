"""The Estuary policy over the real service: deterministic, and its versions are exactly
what the plain-ΔB ledger invariant of the federation tests demands."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import small_env

from simulation.fleet.engine import Recorder
from simulation.fleet.policies import EstuaryPolicy, FleetEnv
from simulation.fleet.run import summarise
from simulation.fleet.trace import load_trace

ROOT = Path(__file__).resolve().parents[4]


def _ledger_check() -> Any:
    """``check_versions_against_ledger`` of the Redis federation test (loaded by path)."""
    path = ROOT / "tests" / "integration" / "test_federation_redis.py"
    spec = importlib.util.spec_from_file_location("federation_ledger_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetEnv]:
    import json

    trace = json.loads((ROOT / "deploy" / "traces" / "stragglers.json").read_text())
    environment = small_env(
        tmp_path_factory.mktemp("estuary"),
        trace,
        devices=12,
        buffer_size=4,
        target_staleness=2.0,
        cohort_min=3,
        cohort_max=3,
        formation_s=2.0,
        max_staleness=16,  # the ledger check's staleness policy
        max_updates=16,
        duration_s=3600.0,
    )
    assert load_trace("stragglers").name == "stragglers"
    yield environment
    environment.trainer.close()


def test_same_seed_and_trace_give_the_same_log_and_figures(env: FleetEnv) -> None:
    first = EstuaryPolicy(env).run()
    second = EstuaryPolicy(env).run()
    assert first.accepted >= 12
    assert len(first.curve) >= 4  # several versions committed
    assert first.log == second.log
    assert first.curve == second.curve
    a = summarise({"estuary": first})
    b = summarise({"estuary": second})
    for key in ("final_bits_per_byte", "bytes_up", "bytes_down", "staleness_histogram", "waits_s"):
        assert a["policies"]["estuary"][key] == b["policies"]["estuary"][key]
    # The overhead split: the service and the devices' own crypto are both timed, apart,
    # inside the core (never inside training, evaluation or cloud-job time).
    ov = first.overhead
    assert ov.service_s > 0 and ov.device_secagg_s > 0
    assert ov.service_s + ov.device_secagg_s <= ov.core_s()
    assert ov.simulator_s() == pytest.approx(ov.core_s() - ov.device_secagg_s)
    wall = a["policies"]["estuary"]["wall_s"]
    assert wall["service"] == ov.service_s and wall["device_secagg"] == ov.device_secagg_s


def test_versions_equal_the_plain_updates_of_their_cohorts(env: FleetEnv, tmp_path: Path) -> None:
    check = _ledger_check()
    assert env.config.server_lr == check.SERVER_LR
    assert check.POLICY.a == env.config.staleness_a
    policy = EstuaryPolicy(env, keep_updates=True)
    rec = policy.run()
    assert rec.accepted >= 12
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    shapes = {name: b.shape for name, b in env.adapter0.b.items()}  # (out, r_max)
    for task_id, (weight, update) in policy.plain_updates.items():
        # The same file the federation test's edge agents write before they upload.
        shaped = {name: update[name].reshape(shapes[name]) for name in update}
        np.savez(ledger / f"{task_id}.npz", __weight__=np.float64(weight), **shaped)
    check.check_versions_against_ledger(policy.store, policy.blobs, ledger)


def _busy_run(tmp_path: Path, **overrides: Any) -> tuple[EstuaryPolicy, Recorder]:
    """Run the stragglers trace with versions of one cohort each and room for several
    cohorts at once (stale updates); ``overrides`` change the fleet's config."""
    import json

    trace = json.loads((ROOT / "deploy" / "traces" / "stragglers.json").read_text())
    busy = small_env(
        tmp_path, trace, **{
            "devices": 16, "buffer_size": 2, "target_staleness": 5.0, "cohort_min": 3,
            "cohort_max": 3, "formation_s": 1.0, "max_updates": 24, "duration_s": 3600.0,
            **overrides,
        },
    )  # fmt: skip
    try:
        policy = EstuaryPolicy(busy)
        return policy, policy.run()
    finally:
        busy.trainer.close()


def _sizes(policy: EstuaryPolicy, rec: Recorder, kind: str) -> dict[str, int]:
    """Updates per cohort id from the log's ``kind`` lines ("c<n> n=<updates>")."""
    names = {f"c{number}": cid for cid, number in policy.cohort_names.items()}
    out = {}
    for _t, logged, _device, detail in rec.log:
        if logged == kind:
            name, n = detail.split(" n=")
            out[names[name]] = int(n)
    return out


def test_staleness_counts_each_update_as_its_version_folded_it_in(tmp_path: Path) -> None:
    policy, rec = _busy_run(tmp_path)
    sizes = _sizes(policy, rec, "accepted")
    members: dict[str, list[int]] = {}  # cohort id -> versions its accepted members trained on
    for (cid, _member), task in policy.tasks.items():
        if task.accepted:
            members.setdefault(cid, []).append(task.version)
    # Members train first, then form cohorts: this run has cohorts of mixed versions.
    assert any(len(set(versions)) > 1 for versions in members.values())
    expected: dict[int, int] = {}
    head = policy.service.ledger.head()
    assert head is not None and head.version >= 3
    for version in range(1, head.version + 1):
        for cid, oldest in (policy.service.ledger.folded_staleness(version) or {}).items():
            assert oldest == version - 1 - min(members[cid])
            assert len(members[cid]) == sizes.pop(cid)
            for trained_on in members[cid]:  # each update at its own staleness
                s = version - 1 - trained_on
                expected[s] = expected.get(s, 0) + 1
    assert rec.staleness.as_dict() == expected
    assert sum(sizes.values()) == rec.accepted - rec.staleness.total  # not yet folded in
    # Every accepted update's weight was fixed at the relay against an older head, so the
    # staleness it lands with is never smaller: the two histograms differ by that wait.
    assert rec.weight_staleness.total == rec.accepted
    assert rec.staleness.mean is not None and rec.weight_staleness.mean is not None
    assert rec.staleness.mean >= rec.weight_staleness.mean
    summary = summarise({"estuary": rec})["policies"]["estuary"]
    assert summary["train_s_per_update"] == rec.work_s / rec.trained
    ended = [t for t, kind, device, _ in rec.log if kind == "end" and device < 0]
    assert len(ended) == 1 and ended[0] > 0
    assert summary["mean_training_at_once"] == (rec.work_s + rec.dropout_s) / ended[0]
    assert 0 < summary["mean_training_at_once"] <= rec.max_training
    assert summary["staleness_at_weight_histogram"] == {
        str(k): v for k, v in rec.weight_staleness.as_dict().items()
    }


def test_a_cohort_dropped_at_the_commit_is_wasted_work_not_accepted(tmp_path: Path) -> None:
    # max_staleness 0: a cohort relayed fresh lands 1 version behind when another commit
    # comes between its share relay and its fold-in (members train first, so that window
    # is the upload and the unmask: short; a pacer cap of 16 keeps several cohorts in it).
    policy, rec = _busy_run(tmp_path, max_staleness=0, target_staleness=8.0)
    accepted = _sizes(policy, rec, "accepted")
    dropped = _sizes(policy, rec, "dropped")
    assert dropped, "this run drops a cohort at a commit (else the test tests nothing)"
    assert set(dropped) <= set(accepted)  # only a buffered sum can be dropped
    folded = set()
    head = policy.service.ledger.head()
    assert head is not None
    for version in range(1, head.version + 1):
        folded |= set(policy.service.ledger.folded_staleness(version) or {})
    assert not folded & set(dropped)  # never folded in
    kept = sum(n for cid, n in accepted.items() if cid not in dropped)
    assert rec.accepted == kept  # the dropped updates no longer count as accepted ...
    assert rec.weight_staleness.total == rec.accepted
    assert rec.discarded >= sum(dropped.values())  # ... but as discarded work
    assert rec.wasted_s > 0
    assert rec.staleness.total == sum(n for cid, n in accepted.items() if cid in folded)
