"""deploy/systemd: every unit passes ``systemd-analyze verify`` and runs a real, hardened role.

The units name the install path /opt/estuary/bin/estuary; ``systemd-analyze verify`` checks
that the command exists, so the test verifies copies that point at this environment's
``estuary`` instead. The template ``estuary-worker@.service`` is verified as an instance.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import DEPLOY, ROLE_OF_COMMAND, load_role, parse_estuary

from edge_client.state import ENROLMENT_FILE
from estuary.cli.exit_codes import ExitCode
from estuary.config import CoordinatorSettings, EdgeSettings, WorkerSettings

SYSTEMD = DEPLOY / "systemd"
INSTALLED_ESTUARY = "/opt/estuary/bin/estuary"
#: The example config each installed /etc/estuary/*.toml is copied from (README, Deploying).
EXAMPLE_CONFIG = {
    "coordinator": DEPLOY / "config" / "coordinator.toml",
    "worker": DEPLOY / "config" / "worker.toml",
    "edge": DEPLOY / "config" / "edge.toml",
}
INSTANCE = "gpu-a"
UNITS = {
    "estuary-coordinator.service",
    "estuary-worker@.service",
    "estuary-edge.service",
    "estuary-edge-enroll.service",
}


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Return each section's ``(key, value)`` pairs in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}: expected once, found {found}"
    return found[0]


def seconds(value: str) -> float:
    """A systemd time span of the forms the units use: ``30s``, ``2min``, ``90``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert match, f"unsupported time span {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def load(name: str) -> dict[str, list[tuple[str, str]]]:
    return parse_unit((SYSTEMD / name).read_text(encoding="utf-8"))


def instantiate(text: str) -> str:
    return text.replace("%i", INSTANCE)


def exec_start(name: str) -> list[str]:
    argv = shlex.split(instantiate(one(load(name), "Service", "ExecStart")))
    assert argv[0] == INSTALLED_ESTUARY, f"{name}: ExecStart runs {argv[0]}"
    return argv[1:]


def test_the_units_are_the_ones_the_readme_installs() -> None:
    assert {p.name for p in SYSTEMD.glob("*.service")} == UNITS


# --------------------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with ExecStart pointed at this environment's ``estuary``."""
    estuary = Path(sys.executable).with_name("estuary")
    assert estuary.is_file(), f"no estuary console script beside {sys.executable}"
    out = tmp_path_factory.mktemp("units")
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        assert INSTALLED_ESTUARY in text, name
        (out / name).write_text(text.replace(INSTALLED_ESTUARY, str(estuary)), encoding="utf-8")
    return out


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): units unverified")
    return subprocess.run(
        [analyze, "verify", *map(str, paths)], capture_output=True, text=True, timeout=60
    )


def unit_paths(folder: Path) -> list[Path]:
    names = [*sorted(UNITS - {"estuary-worker@.service"}), f"estuary-worker@{INSTANCE}.service"]
    return [folder / name for name in names]


def test_systemd_analyze_verify_accepts_every_unit_without_a_warning(rendered: Path) -> None:
    result = verify(unit_paths(rendered))
    # verify exits 0 on unknown keys and unparsable values, and only says so on stderr: any
    # line about one of our units is a failure.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "estuary" in line or str(rendered) in line
    ]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_systemd_analyze_verify_reports_a_broken_unit(rendered: Path, tmp_path: Path) -> None:
    # The check above can fail: the same units, one with a misspelt key and one whose
    # command is missing, are reported.
    for name in UNITS:
        shutil.copy(rendered / name, tmp_path / name)
    coordinator = tmp_path / "estuary-coordinator.service"
    coordinator.write_text(
        coordinator.read_text().replace("ProtectSystem=", "ProtectSytem="), encoding="utf-8"
    )
    edge = tmp_path / "estuary-edge.service"
    edge.write_text(
        re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/estuary", edge.read_text()),
        encoding="utf-8",
    )
    result = verify(unit_paths(tmp_path))
    output = result.stdout + result.stderr
    assert "ProtectSytem" in output
    assert "/nonexistent/estuary" in output and result.returncode != 0


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("name", sorted(UNITS))
def test_exec_start_is_a_real_command_on_a_valid_config(name: str) -> None:
    argv = exec_start(name)
    path, params = parse_estuary(argv)
    role = ROLE_OF_COMMAND[path]
    config = Path(params["config"])
    assert config.parent == Path("/etc/estuary"), config
    env = dict(
        value.split("=", 1)
        for value in (instantiate(v) for v in values(load(name), "Service", "Environment"))
    )
    # The installed file is a copy of the example; it must load with the unit's overrides.
    settings = load_role(role, EXAMPLE_CONFIG[role], env)
    if role == "worker":
        assert isinstance(settings, WorkerSettings)
        assert settings.group == INSTANCE, "the instance name must become the group"
        assert config.name == f"worker-{INSTANCE}.toml"


def test_paths_the_roles_write_are_inside_their_state_directory() -> None:
    # ProtectSystem=strict makes everything else read-only for the service.
    coordinator = load_role("coordinator", EXAMPLE_CONFIG["coordinator"], {})
    worker = load_role("worker", EXAMPLE_CONFIG["worker"], {})
    edge = load_role("edge", EXAMPLE_CONFIG["edge"], {})
    assert isinstance(coordinator, CoordinatorSettings)
    assert isinstance(worker, WorkerSettings)
    assert isinstance(edge, EdgeSettings)
    for name, path in [
        ("estuary-coordinator.service", coordinator.state.blob_dir),
        ("estuary-worker@.service", worker.state.blob_dir),
        ("estuary-edge.service", edge.state_dir),
        ("estuary-edge-enroll.service", edge.state_dir),
    ]:
        state = Path("/var/lib") / one(load(name), "Service", "StateDirectory")
        assert path == state or state in path.parents, f"{name}: {path} is outside {state}"
    # Coordinator and worker groups share one blob directory, so they share one user.
    assert coordinator.state.blob_dir == worker.state.blob_dir
    users = {one(load(n), "Service", "User") for n in UNITS if n.startswith("estuary-")}
    assert one(load("estuary-coordinator.service"), "Service", "User") == one(
        load("estuary-worker@.service"), "Service", "User"
    )
    assert len(users) == 2  # estuary (cloud side) and estuary-edge (the device)


def test_enrolment_runs_only_until_the_device_holds_an_enrolment() -> None:
    enroll = load("estuary-edge-enroll.service")
    state = one(enroll, "Service", "StateDirectory")
    assert one(enroll, "Unit", "ConditionPathExists") == f"!/var/lib/{state}/{ENROLMENT_FILE}"
    assert one(enroll, "Service", "Type") == "oneshot"
    assert exec_start("estuary-edge-enroll.service")[:2] == ["edge", "enroll"]
    edge = load("estuary-edge.service")
    assert "estuary-edge-enroll.service" in one(edge, "Unit", "Requires").split()
    assert "estuary-edge-enroll.service" in one(edge, "Unit", "After").split()
    # Both run as the same dynamic user, so both own the state directory.
    for unit in (enroll, edge):
        assert one(unit, "Service", "DynamicUser") == "yes"
        assert one(unit, "Service", "StateDirectory") == state
    assert one(enroll, "Service", "User") == one(edge, "Service", "User")


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize(
    "name", ["estuary-coordinator.service", "estuary-worker@.service", "estuary-edge.service"]
)
def test_daemons_restart_on_failure_but_not_on_a_config_error(name: str) -> None:
    unit = load(name)
    assert one(unit, "Service", "Restart") == "on-failure"
    assert seconds(one(unit, "Service", "RestartSec")) >= 1
    prevented = {int(c) for c in one(unit, "Service", "RestartPreventExitStatus").split()}
    assert {ExitCode.CONFIG, ExitCode.INPUT} <= prevented
    # A restart after the store was unreachable is the point of restarting.
    assert ExitCode.STATE_UNAVAILABLE not in prevented
    # The clean stop after SIGTERM is a success, not a failure to report or restart.
    assert int(one(unit, "Service", "SuccessExitStatus")) == ExitCode.INTERRUPTED


@pytest.mark.parametrize(
    "name", ["estuary-coordinator.service", "estuary-worker@.service", "estuary-edge.service"]
)
def test_systemd_waits_longer_than_the_shutdown_grace_period(name: str) -> None:
    _, params = parse_estuary(exec_start(name))
    grace = float(params.get("shutdown_grace_s", 10.0))
    assert seconds(one(load(name), "Service", "TimeoutStopSec")) >= grace + 10


def test_worker_group_stop_reaches_every_stage_process() -> None:
    # torchrun's stage processes must get SIGTERM too (the launcher does not forward it).
    assert one(load("estuary-worker@.service"), "Service", "KillMode") == "control-group"


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_are_hardened(name: str) -> None:
    unit = load(name)
    service = dict(unit["Service"])
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert service["ProtectHome"] in ("yes", "read-only")
    assert service["CapabilityBoundingSet"] == ""
    assert service["StateDirectory"]
