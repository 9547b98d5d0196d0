from __future__ import annotations

import json
import time

import pytest
from redis_server import RedisServer
from status_fixtures import cells, fill_run, overlong
from typer.testing import CliRunner

from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode
from estuary.state import open_store
from estuary.state.keys import cohort_key, device_key, version_key, worker_key

pytestmark = pytest.mark.redis


def test_status_shows_what_the_run_wrote(own_redis_server: RedisServer) -> None:
    store = open_store(own_redis_server.url)
    store.put(version_key(0), json.dumps({"version": 0, "updates": 0}).encode())
    store.put(version_key(1), json.dumps({"version": 1, "updates": 8, "eval_bpb": 2.5}).encode())
    store.put(cohort_key("c-1"), json.dumps({"stage": "unmasking", "members": 5}).encode())
    store.put(worker_key("gpu-a"), json.dumps({"jobs_done": 3}).encode())
    store.put(device_key("d1"), json.dumps({"device_class": "phone"}).encode())
    store.put(device_key("d2"), b"\xff not json")
    store.put("head/version", b"{}")  # not a listed section: not shown
    store.close()

    result = CliRunner().invoke(
        app, ["status", "--state", own_redis_server.url, "--format", "json"]
    )

    assert result.exit_code == ExitCode.OK, result.output
    data = json.loads(result.stdout)
    assert [v["id"] for v in data["versions"]] == ["0000000000", "0000000001"]
    assert data["versions"][1]["eval_bpb"] == 2.5
    assert data["cohorts"] == [{"id": "c-1", "stage": "unmasking", "members": 5}]
    assert data["workers"] == [{"id": "gpu-a", "jobs_done": 3}]
    assert data["devices"][0] == {"id": "d1", "device_class": "phone"}
    assert data["devices"][1] == {"id": "d2", "error": "record is not JSON"}
    text = CliRunner().invoke(app, ["status", "--state", own_redis_server.url])
    assert text.exit_code == ExitCode.OK
    assert "versions (2)" in text.stdout and "gpu-a" in text.stdout


def test_status_summary_over_redis_fits_80_columns(own_redis_server: RedisServer) -> None:
    store = open_store(own_redis_server.url)
    fill_run(store, now=time.time())
    store.close()

    text = CliRunner().invoke(
        app, ["status", "--state", own_redis_server.url, "--all"], env={"COLUMNS": "80"}
    )
    data = json.loads(
        CliRunner()
        .invoke(app, ["status", "--state", own_redis_server.url, "--format", "json"])
        .stdout
    )

    assert text.exit_code == ExitCode.OK, text.output
    assert overlong(text.stdout) == [] and "…" not in text.stdout
    assert cells(text.stdout, "phone") == ["phone", "4", "2", "2", "4"]
    assert cells(text.stdout, "laptop") == ["laptop", "16", "2", "0", "4"]
    assert "all cohorts (19)" in text.stdout
    classes = data["summary"]["classes"]
    assert [(c["name"], c["waiting"], c["min_size"]) for c in classes] == [
        ("phone", 2, 4),
        ("laptop", 0, 4),
    ]
    assert data["federation"]["min_size"] == 4 and len(data["forming"]) == 1


def test_status_when_redis_dies(own_redis_server: RedisServer) -> None:
    url = own_redis_server.url
    own_redis_server.kill()
    result = CliRunner().invoke(app, ["status", "--state", url])
    assert result.exit_code == ExitCode.STATE_UNAVAILABLE
    assert "unreachable" in result.output
