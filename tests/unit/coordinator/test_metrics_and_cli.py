"""Coordinator metrics (values move with events) and the ``estuary coordinator`` CLI."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import apply_overrides
from coordinator.metrics import CoordinatorMetrics
from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode
from estuary.config.models import CoordinatorSettings

runner = CliRunner()


def test_metrics_follow_service_events_and_rpcs() -> None:
    metrics = CoordinatorMetrics()
    other = CoordinatorMetrics()  # a second registry in the same process does not collide
    metrics.event("upload", cohort_id="c", member=0, bytes=1000, duplicate=False)
    metrics.event("upload", cohort_id="c", member=0, bytes=1000, duplicate=True)
    metrics.event("weight_assigned", cohort_id="c", member=0, staleness=3, weight=0.5)
    metrics.event(
        "version_committed", version=4, updates=5, cohorts=["c", "d"], adapter_sha256="x",
        folded_staleness=[[0, 2], [3, 3]],
    )  # fmt: skip
    metrics.event("update_dropped", cohort_id="e", updates=3, trained_on=1, reason="stale")
    metrics.rpc("GetTask", "OK", bytes_in=10, bytes_out=20)
    metrics.rpc("GetTask", "UNAUTHENTICATED", bytes_in=5, bytes_out=0)
    assert metrics.value("estuary_uploads_total") == 1
    assert metrics.value("estuary_upload_bytes_total") == 1000
    assert metrics.value("estuary_staleness_bucket", {"le": "2.0"}) == 0
    assert metrics.value("estuary_staleness_bucket", {"le": "4.0"}) == 1
    # Per update folded in, at the staleness its version priced it at: 2 fresh, 3 at 3.
    assert metrics.value("estuary_folded_staleness_bucket", {"le": "0.0"}) == 2
    assert metrics.value("estuary_folded_staleness_bucket", {"le": "2.0"}) == 2
    assert metrics.value("estuary_folded_staleness_bucket", {"le": "4.0"}) == 5
    assert metrics.value("estuary_folded_staleness_sum") == 9
    assert metrics.value("estuary_updates_dropped_total") == 3  # per update, not per cohort
    assert metrics.value("estuary_version") == 4
    assert metrics.value("estuary_versions_committed_total") == 1
    assert metrics.value("estuary_rpcs_total", {"method": "GetTask", "code": "OK"}) == 1
    assert metrics.value("estuary_rpc_bytes_in_total", {"rpc": "GetTask"}) == 15
    assert other.value("estuary_uploads_total") == 0
    snapshot = {"version": 5, "cohorts": {"SHARE_KEYS": 2}, "devices_active": 7}
    metrics.refresh(snapshot)
    assert metrics.value("estuary_cohorts", {"stage": "SHARE_KEYS"}) == 2
    assert metrics.value("estuary_cohorts", {"stage": "UNMASKING"}) == 0
    assert metrics.value("estuary_devices_active") == 7
    metrics.store_probe(0.002)
    assert metrics.value("estuary_store_up") == 1
    assert metrics.value("estuary_store_ping_seconds_count") == 1
    metrics.store_probe(None)
    assert metrics.value("estuary_store_up") == 0
    assert metrics.value("estuary_store_ping_seconds_count") == 1  # a failed probe has no RTT


def test_metrics_http_endpoint_serves_and_shuts_down() -> None:
    metrics = CoordinatorMetrics()
    metrics.event("upload", bytes=5)
    port = metrics.serve(0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "estuary_uploads_total 1.0" in body
    finally:
        metrics.close()
    metrics.close()  # idempotent


def _config(tmp_path: Path, url: str = "memory://") -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(f'[state]\nurl = "{url}"\n\n[tls]\nallow_plaintext = true\n')
    return path


def test_token_refuses_a_memory_store(tmp_path: Path) -> None:
    result = runner.invoke(app, ["coordinator", "token", "--config", str(_config(tmp_path))])
    assert result.exit_code == ExitCode.CONFIG
    assert "vanish" in result.stderr


def test_token_with_unreachable_store_is_state_unavailable(tmp_path: Path) -> None:
    config = _config(tmp_path, "redis://127.0.0.1:1/0?attempts=1&socket_connect_timeout_s=0.2")
    result = runner.invoke(app, ["coordinator", "token", "--config", str(config)])
    assert result.exit_code == ExitCode.STATE_UNAVAILABLE, result.output


def test_serve_with_invalid_config_exits_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nlisten = 'nowhere'\n")
    result = runner.invoke(app, ["coordinator", "serve", "--config", str(path)])
    assert result.exit_code == ExitCode.CONFIG


def test_flags_override_tls_and_listen(tmp_path: Path) -> None:
    settings = CoordinatorSettings(tls={"allow_plaintext": True})
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    out = apply_overrides(settings, tls_cert=cert, tls_key=key, listen="127.0.0.1:0")
    assert out.tls.cert_file == cert and out.tls.key_file == key
    assert out.server.listen == "127.0.0.1:0"
    with pytest.raises(ValueError, match="both"):
        apply_overrides(settings, tls_cert=cert)
