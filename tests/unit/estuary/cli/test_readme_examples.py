"""Every example config in deploy/config/, exercised the way README.md uses it.

The commands are read from README.md's ``bash`` blocks, not copied here, so a README that
changes is tested as it now reads; a command on an example config that this file does not
know how to exercise fails :func:`test_every_readme_command_is_exercised`.

What "exercised" means per command:

- ``config check``, ``edge enroll``, ``edge status``, ``edge run``, ``worker run --dry-run``
  run exactly as written, in the repository root, with the environment the README sets up
  (``export`` lines) plus overrides that point the example's device at a coordinator this
  test serves on loopback over TLS (its certificates made here): the token, TLS and
  signatures are real, and the coordinator's enrolment is the real ``DeviceRegistry``.
- Commands that need a deployment's infrastructure (a Redis at ``redis:6379``, PKI under
  /etc/estuary, minutes of training) are listed in :data:`NEEDS_INFRASTRUCTURE` with the
  reason; their example still loads through the role's settings, with every secret it names
  set as a deployment sets it, and each secret reads back as set.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki import make_pki
from pydantic import BaseModel
from typer.testing import CliRunner

from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode
from estuary.config import SecretRef, load_settings, local_problems

REPO = Path(__file__).resolve().parents[4]
README = REPO / "README.md"
EXAMPLES = REPO / "deploy" / "config"
ROLE_OF = {
    "coordinator.toml": "coordinator",
    "worker.toml": "worker",
    "edge.toml": "edge",
    "simulation.toml": "simulation",
}
#: README commands on an example config that need more than one test process has, and why.
NEEDS_INFRASTRUCTURE = {
    ("coordinator", "serve"): "a Redis at redis:6379 and the PKI under /etc/estuary/pki",
    ("worker", "run"): "a Redis at redis:6379 and /run/secrets/redis-password",
    ("worker", "generate"): "a Redis at redis:6379 holding version 3",
    ("simulate",): "minutes of training; `make demo` runs it, tests/integration a small one",
}
runner = CliRunner()


def _bash_lines() -> Iterator[str]:
    in_bash = False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash:
            yield line


def readme_commands() -> list[list[str]]:
    """The ``estuary`` command lines of README.md that name an example config."""
    return [
        shlex.split(line, comments=True)
        for line in _bash_lines()
        if line.startswith("estuary ") and "deploy/config/" in line
    ]


def readme_exports() -> dict[str, str]:
    """``export NAME=value`` lines of README.md's bash blocks."""
    exports = {}
    for line in _bash_lines():
        match = re.match(r"export ([A-Za-z_][A-Za-z0-9_]*)=(\S*)", line)
        if match:
            exports[match.group(1)] = match.group(2)
    return exports


def _kind(argv: list[str]) -> tuple[str, ...]:
    words = [w for w in argv[1:] if not w.startswith("-") and "/" not in w]
    return tuple(words[:1]) if words[:1] == ["simulate"] else tuple(words[:2])


def _secret_refs(model: BaseModel, prefix: str = "") -> dict[str, SecretRef]:
    found: dict[str, SecretRef] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretRef):
            found[prefix + name] = value
        elif isinstance(value, BaseModel):
            found.update(_secret_refs(value, f"{prefix}{name}."))
    return found


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("ESTUARY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository root


def invoke(argv: list[str]) -> Any:
    assert argv[0] == "estuary"
    return runner.invoke(app, argv[1:])


# --------------------------------------------------------------------------- coverage


def test_every_readme_command_is_exercised() -> None:
    commands = readme_commands()
    named = {Path(w).name for argv in commands for w in argv if w.startswith("deploy/config/")}
    assert named == {p.name for p in EXAMPLES.glob("*.toml")}, "an example the README never uses"
    run_here = {("config", "check"), ("edge", "enroll"), ("edge", "status"), ("edge", "run")}
    for argv in commands:
        kind = _kind(argv)
        if kind == ("worker", "run") and "--dry-run" in argv:
            continue
        assert kind in run_here or kind in NEEDS_INFRASTRUCTURE, (
            f"README runs `{shlex.join(argv)}`; teach this test to exercise it"
        )


@pytest.mark.parametrize("name", sorted(ROLE_OF))
def test_example_loads_with_its_secrets_set(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the secrets of the example, set the way a deployment sets them.
    role = ROLE_OF[name]
    refs = _secret_refs(load_settings(role, EXAMPLES / name))
    values = {}
    for field, ref in refs.items():
        if ref.env is not None:
            values[field] = f"secret-of-{field}"
            monkeypatch.setenv(ref.env, values[field])

    # Execute: load again, as the role does, with those variables set.
    settings = load_settings(role, EXAMPLES / name)

    # Assert: each secret reads back as itself; none was taken for a settings override.
    again = _secret_refs(settings)
    assert {f: again[f].reveal() for f in values} == values
    assert [p for p in local_problems(settings) if p.kind == "secret" and p.field in values] == []


# --------------------------------------------------------------------------- run as written


def readme_command(*words: str) -> list[str]:
    for argv in readme_commands():
        if _kind(argv) == words:
            return argv
    raise AssertionError(f"README has no `estuary {' '.join(words)}` on an example config")


def test_readme_config_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "from-the-deployment")
    argv = readme_command("config", "check")

    result = invoke(argv)

    assert result.exit_code == ExitCode.OK, result.output
    assert "valid coordinator configuration" in result.stdout
    assert "from-the-deployment" not in result.output
    # What this machine lacks is said (the example's PKI lives under /etc/estuary/pki).
    if not Path("/etc/estuary/pki/server.pem").exists():
        assert "tls.cert_file: server certificate /etc/estuary/pki/server.pem" in (result.output)


def test_readme_worker_dry_run() -> None:
    argv = next(a for a in readme_commands() if "--dry-run" in a)

    result = invoke(argv)

    assert result.exit_code == ExitCode.OK, result.output
    assert "--nproc-per-node=2" in result.stdout  # the example's stages = 2
    assert "deploy/config/worker.toml" in result.stdout


class Coordinator:
    """Enroll and GetTask of an EdgeService, answered by the real DeviceRegistry."""

    def __init__(self) -> None:
        from coordinator.enrolment import DeviceRegistry
        from estuary.state.memory import MemoryStore

        self.registry = DeviceRegistry(MemoryStore(), device_classes=["phone", "laptop"])
        self.authenticated: list[str] = []

    def servicer(self) -> Any:
        from coordinator.enrolment import EnrolmentError, Unauthenticated
        from coordinator.grpc_service import status_of
        from estuary.auth import request_body_sha256, signed_auth_from
        from estuary.proto.v1 import common_pb2, edge_pb2, edge_pb2_grpc

        outer = self

        class Servicer(edge_pb2_grpc.EdgeServiceServicer):  # type: ignore[misc]
            def Enroll(self, request: Any, context: Any) -> Any:
                try:
                    device = outer.registry.enroll(
                        request.token,
                        public_key=request.identity_public_key,
                        device_class=request.device_class,
                    )
                except EnrolmentError as exc:
                    context.abort(*status_of(exc))
                return edge_pb2.EnrollResponse(
                    device_id=device.device_id,
                    device_class=common_pb2.DeviceClass(name=device.device_class, rank=16),
                    r_max=16,
                )

            def GetTask(self, request: Any, context: Any) -> Any:
                try:
                    device = outer.registry.authenticate(
                        signed_auth_from(request),
                        method="GetTask",
                        body_sha256=request_body_sha256(request),
                    )
                except Unauthenticated as exc:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                # The signed request came through: end `edge run` (it loops until told
                # otherwise) by revoking the device, which it must report.
                outer.authenticated.append(device.device_id)
                outer.registry.revoke(device.device_id)
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "device revoked (end of test)")

        return Servicer()


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[Coordinator, str, dict[str, Path]]]:
    from estuary.proto.v1 import edge_pb2_grpc

    pki = make_pki(tmp_path / "pki")
    coord = Coordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(coord.servicer(), server)
    credentials = grpc.ssl_server_credentials(
        [(pki["server_key"].read_bytes(), pki["server_cert"].read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield coord, f"127.0.0.1:{port}", pki
    finally:
        server.stop(grace=None)


def test_readme_edge_commands_on_the_example(
    coordinator: tuple[Coordinator, str, dict[str, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the README's exports (the token from the coordinator in place of "..."),
    # and overrides pointing the example device at this test's coordinator.
    coord, target, pki = coordinator
    token = coord.registry.issue_token()
    exports = readme_exports()
    assert "ENROLMENT_TOKEN" in exports, "the README must say which variable holds the token"
    for name in exports:
        monkeypatch.setenv(name, token if name == "ENROLMENT_TOKEN" else exports[name])
    data = tmp_path / "notes"
    data.mkdir()
    (data / "a.txt").write_text("def f():\n    return 1\n" * 20, encoding="utf-8")
    monkeypatch.setenv("ESTUARY_COORDINATOR", target)
    monkeypatch.setenv("ESTUARY_ENROL_COORDINATOR", target)
    monkeypatch.setenv("ESTUARY_TLS__CA_FILE", str(pki["ca"]))
    monkeypatch.setenv("ESTUARY_STATE_DIR", str(tmp_path / "edge"))
    monkeypatch.setenv("ESTUARY_DATA_DIR", str(data))

    # Execute + Assert: enrol, as written.
    enrolled = invoke(readme_command("edge", "enroll"))
    assert enrolled.exit_code == ExitCode.OK, enrolled.output
    assert "enrolled as device" in enrolled.stdout
    record = json.loads((tmp_path / "edge" / "enrolment.json").read_text(encoding="utf-8"))
    assert coord.registry.get(record["device_id"]) is not None

    # status, as written (JSON): the enrolment it just made.
    status = invoke(readme_command("edge", "status"))
    assert status.exit_code == ExitCode.OK, status.output
    shown = json.loads(status.stdout)
    assert shown["enrolled"] is True and shown["enrolment"]["device_id"] == record["device_id"]

    # run, as written: its first signed request reaches the coordinator and verifies.
    run = invoke(readme_command("edge", "run"))
    assert coord.authenticated == [record["device_id"]]
    assert run.exit_code == ExitCode.PROTOCOL, run.output
    assert "end of test" in run.output

    # The same token on another device: refused as used, naming the device that used it.
    monkeypatch.setenv("ESTUARY_STATE_DIR", str(tmp_path / "other"))
    again = invoke(readme_command("edge", "enroll"))
    assert again.exit_code == ExitCode.PROTOCOL, again.output
    assert "enrolment token already used" in again.output
    assert record["device_id"] in again.output

    # A plaintext agent against this TLS coordinator: said at once, exit code 3.
    monkeypatch.setenv("ESTUARY_TLS__ALLOW_PLAINTEXT", "true")
    plaintext = invoke(readme_command("edge", "enroll"))
    assert plaintext.exit_code == ExitCode.CONFIG, plaintext.output
    assert "PLAINTEXT_TO_TLS_SERVER" in plaintext.output


def test_old_style_secret_variable_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The example as it used to read, with the token exported as it told the user to.
    old = tmp_path / "edge.toml"
    text = (EXAMPLES / "edge.toml").read_text(encoding="utf-8")
    old.write_text(text.replace('"ENROLMENT_TOKEN"', '"ESTUARY_ENROLMENT_TOKEN"'), "utf-8")
    assert "ESTUARY_ENROLMENT_TOKEN" in old.read_text(encoding="utf-8")

    unset = runner.invoke(app, ["edge", "enroll", "--config", str(old)])
    monkeypatch.setenv("ESTUARY_ENROLMENT_TOKEN", "tok-123")
    exported = runner.invoke(app, ["edge", "enroll", "--config", str(old)])

    for result in (unset, exported):
        assert result.exit_code == ExitCode.CONFIG, result.output
        assert "tok-123" not in result.output
    assert "prefix of settings overrides" in unset.output
    assert "ENROLMENT_TOKEN" in unset.output
    assert "ESTUARY_ENROLMENT_TOKEN__ENV" in exported.output
    assert "rename it" in exported.output
