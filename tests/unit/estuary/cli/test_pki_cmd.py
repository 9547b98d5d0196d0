"""``estuary pki init`` / ``estuary pki server``: files, modes, refusals, exit codes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from cryptography import x509
from typer.testing import CliRunner

from estuary.cli.app import app
from estuary.cli.exit_codes import ExitCode

runner = CliRunner()


def test_init_then_server_writes_a_working_pki(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    init = runner.invoke(app, ["pki", "init", str(folder), "--format", "json"])
    assert init.exit_code == ExitCode.OK, init.output
    written = json.loads(init.stdout)
    assert set(written) == {
        "federation_ca_cert",
        "federation_ca_key",
        "device_ca_cert",
        "device_ca_key",
    }
    server = runner.invoke(
        app, ["pki", "server", str(folder), "--dns", "coord.example", "--ip", "10.0.0.5"]
    )
    assert server.exit_code == ExitCode.OK, server.output
    for name in ("federation-ca.key", "device-ca.key", "server.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    leaf = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((folder / "federation-ca.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


def test_init_twice_exits_input_without_touching_keys(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    assert runner.invoke(app, ["pki", "init", str(folder)]).exit_code == ExitCode.OK
    key = (folder / "device-ca.key").read_bytes()
    again = runner.invoke(app, ["pki", "init", str(folder)])
    assert again.exit_code == ExitCode.INPUT
    assert "refusing to overwrite" in again.output
    assert (folder / "device-ca.key").read_bytes() == key


def test_server_refusals_exit_codes(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["pki", "server", str(tmp_path), "--dns", "a.example"])
    assert missing.exit_code == ExitCode.INPUT
    assert "federation-ca.pem" in missing.output
    folder = tmp_path / "pki"
    runner.invoke(app, ["pki", "init", str(folder)])
    bad_ip = runner.invoke(app, ["pki", "server", str(folder), "--ip", "10.0.0.999"])
    assert bad_ip.exit_code == ExitCode.USAGE
    assert "10.0.0.999" in bad_ip.output
    no_name = runner.invoke(app, ["pki", "server", str(folder)])
    assert no_name.exit_code == ExitCode.USAGE
