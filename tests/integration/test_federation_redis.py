"""The federation across processes on one real redis-server.

Two coordinator processes (`estuary coordinator serve`) share a redis-server and a blob
directory; eight edge-agent processes in two device classes train, aggregate securely and
upload. One edge is killed (SIGKILL) during training and restarted; one coordinator is
killed mid-run and restarted. The run must reach its target version, versions must
strictly increase, and every committed version must equal the previous one plus the
server learning rate times the staleness-discounted mean of the plain updates of exactly
the survivors of the cohorts it names — each recorded by its device in a test-only
ledger — so no acknowledged upload is lost or counted twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from redis_server import RedisServer, free_port

from coordinator.enrolment import DeviceRegistry
from coordinator.staleness import StalenessPolicy
from estuary.adapters import get_adapter
from estuary.state import open_store
from estuary.state.blobs import BlobStore
from estuary.state.keys import HEAD_KEY, cohort_key, version_key

# Real processes in real time (SIGKILLs cannot run on a virtual clock): about 2 minutes on
# a quiet 2-core machine, so the limits leave room for a machine busy with other work.
pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
EDGE = Path(__file__).with_name("federation_edge.py")
TARGET_VERSIONS = 3
RUN_TIMEOUT_S = 600.0
SERVER_LR = 1.0
#: The staleness rule the coordinators run with (the [aggregation] section below).
POLICY = StalenessPolicy(kind="polynomial", a=0.5, max_staleness=16)
PACKAGES = ("json", "email", "http", "logging", "unittest", "asyncio", "xml", "urllib")


def coordinator_config(path: Path, *, node: str, port: int, redis_url: str, blobs: Path) -> Path:
    path.write_text(
        f"""
node_id = "{node}"
workers = "local"
[server]
listen = "127.0.0.1:{port}"
metrics_port = 0
device_requests_per_s = 200.0
device_burst = 400
[tls]
allow_plaintext = true
[state]
url = "{redis_url}"
blob_dir = "{blobs}"
[model]
preset = "tiny"
r_max = 8
[[device_classes]]
name = "phone"
rank = 2
expected_task_s = 5.0
[[device_classes]]
name = "laptop"
rank = 8
expected_task_s = 3.0
[aggregation]
buffer_size = 4
server_lr = {SERVER_LR}
staleness = "polynomial"
staleness_a = 0.5
max_staleness = 16
# Every version here must be its predecessor plus a step; a rollback of the guard
# (tests/unit/coordinator/test_guard.py) would repeat an older adapter instead.
guard = false
lease_ttl_s = 4.0
[pacing]
target_staleness = 4.0
retry_after_min_s = 0.3
retry_after_max_s = 5.0
[cohort]
min_size = 3
max_size = 4
threshold_fraction = 0.6
deadline_s = 25.0
key_timeout_s = 8.0
formation_s = 0.5
bits = 32
clip_norm = 0.7
[training]
local_steps = 2
learning_rate = 0.01
batch_size = 2
seq_len = 32
grad_clip_norm = 0.7
"""
    )
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", ESTUARY_LOG_LEVEL="INFO")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def start_coordinator(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "estuary.cli.app", "coordinator", "serve", "--config", str(config)],
        env=_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def start_edge(
    state: Path,
    target: str,
    device_class: str,
    package: str,
    ledger: Path,
    token: str,
    *,
    kill: bool,
    log: Path,
) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            str(EDGE),
            str(state),
            target,
            device_class,
            package,
            str(ledger),
            token,
            "1" if kill else "0",
        ],
        env=_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def head_version(store: object) -> int:
    record = store.get(HEAD_KEY)  # type: ignore[attr-defined]
    return -1 if record is None else int(json.loads(record.value)["version"])


def wait_for(predicate: object, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    tails = "\n".join(
        f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
        for p in sorted(logs.glob("*.log"))
    )
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def test_two_coordinators_eight_edges_kills_and_exact_versions(
    tmp_path: Path, redis_binary: str
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    blobs_dir = tmp_path / "blobs"
    procs: list[subprocess.Popen[bytes]] = []
    with RedisServer(tmp_path / "redis", binary=redis_binary) as redis:
        store = open_store(redis.url)
        ports = [free_port(), free_port()]
        configs = [
            coordinator_config(
                tmp_path / f"c{i}.toml",
                node=f"c{i}",
                port=ports[i],
                redis_url=redis.url,
                blobs=blobs_dir,
            )
            for i in range(2)
        ]
        coordinators = [start_coordinator(configs[i], logs / f"c{i}.log") for i in range(2)]
        procs += coordinators
        try:
            wait_for(lambda: head_version(store) == 0, 120, "version 0", logs)
            registry = DeviceRegistry(store, device_classes=["phone", "laptop"])
            edges: list[subprocess.Popen[bytes]] = []
            for i, package in enumerate(PACKAGES):
                device_class = ("phone", "laptop")[i % 2]
                token = registry.issue_token(device_class=device_class)
                edges.append(
                    start_edge(
                        tmp_path / f"edge{i}",
                        f"127.0.0.1:{ports[i % 2]}",
                        device_class,
                        package,
                        ledger,
                        token,
                        kill=i == 0,
                        log=logs / f"edge{i}.log",
                    )
                )
            procs += edges
            # Edge 0 kills itself (SIGKILL) in its first training; restart it from its state.
            wait_for(lambda: edges[0].poll() is not None, 180, "edge 0 to die", logs)
            assert edges[0].returncode == -signal.SIGKILL
            edges[0] = start_edge(
                tmp_path / "edge0",
                f"127.0.0.1:{ports[0]}",
                "phone",
                PACKAGES[0],
                ledger,
                "-",
                kill=False,
                log=logs / "edge0.log",
            )
            procs.append(edges[0])
            # Coordinator 1 dies mid-run and comes back on the same port.
            wait_for(lambda: head_version(store) >= 1, RUN_TIMEOUT_S, "version 1", logs)
            coordinators[1].send_signal(signal.SIGKILL)
            coordinators[1].wait(timeout=10)
            time.sleep(1.0)
            restarted = start_coordinator(configs[1], logs / "c1.log")
            procs.append(restarted)
            wait_for(
                lambda: head_version(store) >= TARGET_VERSIONS,
                RUN_TIMEOUT_S,
                f"version {TARGET_VERSIONS}",
                logs,
            )
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        check_versions_against_ledger(store, BlobStore(blobs_dir), ledger)


def check_versions_against_ledger(store: object, blobs: BlobStore, ledger: Path) -> None:
    head = head_version(store)
    assert head >= TARGET_VERSIONS
    records = [
        json.loads(store.get(version_key(v)).value)  # type: ignore[attr-defined]
        for v in range(head + 1)
    ]
    # Versions strictly increase: every number from 0 to the head has exactly one record.
    assert [r["version"] for r in records] == list(range(head + 1))
    counted: set[str] = set()
    previous = get_adapter(blobs, records[0]["adapter_sha256"])
    for record in records[1:]:
        current = get_adapter(blobs, record["adapter_sha256"])
        total = {name: np.zeros_like(b, dtype=np.float64) for name, b in previous.b.items()}
        updates = 0
        for cohort_id in record["cohorts"]:
            cohort = json.loads(store.get(cohort_key(cohort_id)).value)  # type: ignore[attr-defined]
            assert cohort["status"] == "completed"
            # Each member counts at the staleness it lands with (coordinator.versions):
            # members train first, so they may have trained on different versions.
            trained = cohort.get("member_versions") or [cohort["version"]] * len(cohort["members"])
            landed = [record["version"] - 1 - trained[m] for m in cohort["survivors"]]
            assert record["staleness"][cohort_id] == max(landed)
            priced = sum(POLICY.commit_weight(s) for s in landed)
            cohort_sum = {name: np.zeros_like(t) for name, t in total.items()}
            cohort_weight, cohort_updates = 0.0, 0
            for member in cohort["survivors"]:
                task_id = f"{cohort_id}-{member}"
                assert task_id not in counted, f"{task_id} counted in two versions"
                counted.add(task_id)
                entry = np.load(ledger / f"{task_id}.npz")
                weight = float(entry["__weight__"])
                for name in total:
                    cohort_sum[name] += weight * entry[name].astype(np.float64)
                cohort_weight += weight
                cohort_updates += 1
            discount = min(1.0, priced / cohort_weight)
            for name in total:
                total[name] += discount * cohort_sum[name]
            updates += cohort_updates
        assert updates == record["updates"] >= 4
        assert not record["step_clipped"]  # updates clipped at 0.7 never reach the bound
        for name, b in current.b.items():
            expected = previous.b[name] + SERVER_LR * total[name] / updates
            np.testing.assert_allclose(b, expected, atol=2e-5, err_msg=name)
        previous = current
    # Every completed cohort's sum is in exactly one version or still waits in the buffer.
    completed = {
        key[len("cohort/") :]
        for key, rec in store.scan("cohort/").items()  # type: ignore[attr-defined]
        if json.loads(rec.value)["status"] == "completed"
    }
    folded = {c for r in records for c in r["cohorts"]}
    pending = {k[len("buffer/") :] for k in store.scan("buffer/")}  # type: ignore[attr-defined]
    assert completed == folded | pending
    assert not folded & pending
