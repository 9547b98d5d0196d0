"""The [tls] fields of device certificates refuse combinations that cannot work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from estuary.config.models import EdgeSettings, ServerTLSSettings

SERVER = {"cert_file": "s.pem", "key_file": "s.key"}


def test_device_ca_needs_both_files_and_a_client_ca() -> None:
    with pytest.raises(ValidationError, match="device_ca_cert_file and device_ca_key_file"):
        ServerTLSSettings(**SERVER, client_ca_file="d.pem", device_ca_cert_file="d.pem")
    with pytest.raises(ValidationError, match="client_ca_file: needed with device_ca_cert_file"):
        ServerTLSSettings(**SERVER, device_ca_cert_file="d.pem", device_ca_key_file="d.key")
    ok = ServerTLSSettings(
        **SERVER, client_ca_file="d.pem", device_ca_cert_file="d.pem", device_ca_key_file="d.key"
    )
    assert ok.device_cert_lifetime_s == 7 * 86_400


def test_enrol_port_needs_a_server_certificate_and_an_address() -> None:
    with pytest.raises(ValidationError, match="enrol_listen: needs cert_file"):
        ServerTLSSettings(allow_plaintext=True, enrol_listen="0.0.0.0:50052")
    with pytest.raises(ValidationError, match="enrol_listen"):
        ServerTLSSettings(**SERVER, enrol_listen="no port")
    with pytest.raises(ValidationError, match="device_cert_lifetime_s"):
        ServerTLSSettings(**SERVER, device_cert_lifetime_s=10)


def test_edge_enrol_coordinator_is_host_port() -> None:
    assert EdgeSettings(enrol_coordinator="coord.example:50052").enrol_coordinator == (
        "coord.example:50052"
    )
    with pytest.raises(ValidationError, match="enrol_coordinator"):
        EdgeSettings(enrol_coordinator="coord.example")
