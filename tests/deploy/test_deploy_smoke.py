"""tests/deploy/smoke.py's translation of compose names onto this machine.

The smoke (``make deploy-smoke``) boots the compose services as local processes; these
tests check, without starting anything, that what it rewrites leaves no container path or
service name behind in any role's effective settings, and that it rewrites nothing else.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path, PurePosixPath

import pytest
import smoke
from deploy_checks import load_role

from estuary.config import CoordinatorSettings, EdgeSettings, WorkerSettings

SERVICES = smoke.COMPOSE["services"]


@pytest.fixture
def tr(tmp_path: Path) -> smoke.Translation:
    return smoke.Translation(tmp_path, SERVICES)


def _effective(tr: smoke.Translation, name: str, role: str) -> object:
    command = SERVICES[name]["command"]
    config = smoke.Smoke.config_path(_smoke(tr), name, command)
    env = {
        k: v
        for k, v in _smoke(tr).env(name, command, hostname=name, extra={}).items()
        if k.startswith("ESTUARY_") or k in SERVICES[name].get("environment", {})
    }
    return load_role(role, config, env)


def _smoke(tr: smoke.Translation) -> smoke.Smoke:
    runner = smoke.Smoke(tr.root)
    runner.tr = tr
    return runner


def _is_local(path: Path | None, tr: smoke.Translation) -> bool:
    if path is None:
        return True
    resolved = Path(path)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return any(resolved.is_relative_to(base) for base in (tr.root, smoke.DOCKER, stdlib))


def test_addresses_name_loopback_and_agents_dial_the_port_the_replicas_listen_on(
    tr: smoke.Translation,
) -> None:
    coord = _effective(tr, "coordinator", "coordinator")
    assert isinstance(coord, CoordinatorSettings)
    host, port = coord.server.listen.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert coord.tls.enrol_listen is not None
    enrol_host, enrol_port = coord.tls.enrol_listen.rsplit(":", 1)
    assert enrol_host == "127.0.0.1" and enrol_port != port
    assert coord.state.url.startswith(f"redis://127.0.0.1:{tr.port('redis', 6379)}/")
    worker = _effective(tr, "worker", "worker")
    assert isinstance(worker, WorkerSettings)
    assert worker.state.url == coord.state.url
    for name in ("edge-1", "edge-4"):
        edge = _effective(tr, name, "edge")
        assert isinstance(edge, EdgeSettings)
        assert edge.coordinator == f"127.0.0.1:{port}"
        assert edge.enrol_coordinator == f"127.0.0.1:{enrol_port}"


def test_every_path_in_the_effective_settings_lies_in_the_run_or_the_repository(
    tr: smoke.Translation,
) -> None:
    coord = _effective(tr, "coordinator", "coordinator")
    assert isinstance(coord, CoordinatorSettings)
    paths = [
        coord.tls.cert_file,
        coord.tls.key_file,
        coord.tls.client_ca_file,
        coord.tls.device_ca_cert_file,
        coord.tls.device_ca_key_file,
        coord.state.blob_dir,
        coord.model.path,
    ]
    assert all(_is_local(p, tr) for p in paths), paths
    # the PKI is the run's own, never deploy/docker/pki/
    assert coord.tls.key_file == tr.root / "pki" / "server.key"
    assert coord.model.path == tr.root / "volumes" / "base"
    edge = _effective(tr, "edge-2", "edge")
    assert isinstance(edge, EdgeSettings)
    assert edge.state_dir == tr.root / "volumes" / "edge-2-state"
    assert edge.data_dir == Path(sysconfig.get_paths()["stdlib"]) / "email"
    assert edge.tls.ca_file == tr.root / "pki" / "federation-ca.pem"


def test_only_container_names_are_rewritten(tr: smoke.Translation) -> None:
    assert tr.value("coordinator", "laptop") == "laptop"
    assert tr.value("coordinator", "/not/mounted/anywhere") == "/not/mounted/anywhere"
    assert tr.value("coordinator", "example.org:443") == "example.org:443"
    assert tr.value("edge-1", "coordinator:50051") == tr.value("coordinator", "0.0.0.0:50051")
    assert tr.value("edge-1", "coordinator:50051") != tr.value("edge-1", "coordinator:50052")
    url = tr.value("worker", "redis://:secret@redis:6379/2")
    assert url == f"redis://:secret@127.0.0.1:{tr.port('redis', 6379)}/2"
    assert tr.path("base", str(PurePosixPath("/var/lib/estuary/base"))) == str(
        tr.root / "volumes" / "base"
    )


def test_an_undeclared_volume_is_refused(tr: smoke.Translation) -> None:
    with pytest.raises(smoke.SmokeFailure, match="not declared"):
        tr.volume("no-such-volume")


def test_the_base_override_changes_the_step_count_and_nothing_else(tmp_path: Path) -> None:
    runner = smoke.Smoke(tmp_path)
    written = [str(a) for a in SERVICES["base"]["command"]]
    assert runner.base_command() == written
    smaller = runner.base_command(30)
    changed = [i for i, (a, b) in enumerate(zip(written, smaller, strict=True)) if a != b]
    assert changed == [written.index("--pretrain-steps") + 1]
    assert smaller[changed[0]] == "30"
    runner.services = {**runner.services, "base": {"command": ["model", "init"]}}
    with pytest.raises(smoke.SmokeFailure, match="--pretrain-steps"):
        runner.base_command(30)
