"""Enrolment: who this device is to the coordinator.

:func:`enroll` turns a one-time token into ``enrolment.json``: the identity key is
generated on the device (an existing one is kept) and only its public half is sent.
Over TLS without a configured client certificate it also asks for one by CSR
(:mod:`edge_client.certificate`); a coordinator with a device CA answers with a
short-lived certificate, stored in the state directory and used from then on.
:class:`Identity` is what every later request is signed with: the key, loaded once and
checked against the enrolment record, so a state directory whose key and record
disagree is refused before anything is sent.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import grpc

from edge_client.certificate import DeviceCertificate, IssuedPair
from edge_client.errors import AgentError, TLSFailure
from edge_client.rpc import EdgeRpc
from edge_client.state import EdgeState, StateError
from estuary import __version__
from estuary.auth import device_id_for, raw_public_key
from estuary.pki import csr_proof
from estuary.proto.v1 import edge_pb2

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["Identity", "enroll"]

logger = logging.getLogger(__name__)


class Identity:
    """The enrolled device's identity key, read from its state directory on first use.

    Parameters
    ----------
    state
        The device's state directory.
    """

    def __init__(self, state: EdgeState) -> None:
        self._state = state
        self._key: Ed25519PrivateKey | None = None
        self._device_id = ""

    @property
    def device_id(self) -> str:
        """The device id of the loaded key; empty before :meth:`key` succeeded."""
        return self._device_id

    def key(self) -> Ed25519PrivateKey:
        """Return the identity key of this enrolled device.

        Raises
        ------
        AgentError
            If the device is not enrolled, the key is unreadable, or the key's device id
            is not the one ``enrolment.json`` names.
        """
        if self._key is None:
            state = self._state
            enrolment = state.load_enrolment()
            if enrolment is None:
                raise AgentError(
                    f"device not enrolled ({state.enrolment_path} is missing); "
                    "run `estuary edge enroll` first"
                )
            try:
                key = state.identity_key()
            except StateError as exc:
                raise AgentError(str(exc)) from exc
            device_id = device_id_for(raw_public_key(key))
            if device_id != enrolment.device_id:
                raise AgentError(
                    f"{state.identity_path} belongs to device {device_id}, but "
                    f"{state.enrolment_path} names {enrolment.device_id}"
                )
            self._key = key
            self._device_id = device_id
        return self._key


async def enroll(
    rpc: EdgeRpc, state: EdgeState, *, token: str, device_class: str
) -> dict[str, Any]:
    """Enrol the device of ``state`` with a one-time ``token`` as ``device_class``.

    Parameters
    ----------
    rpc
        The channel to the coordinator; its target is recorded as the coordinator.
    state
        The device's state directory; receives the identity key and ``enrolment.json``.
    token
        The one-time enrolment token.
    device_class
        The device class to enrol as.

    Returns
    -------
    dict
        The enrolment record (device_id, device_class, rank, r_max, coordinator,
        enrolled_at).

    Raises
    ------
    ValueError
        If ``token`` or ``device_class`` is empty.
    TLSFailure
        If the TLS connection to the coordinator cannot work as configured.
    AgentError
        If the device is already enrolled, or the coordinator refuses the token (unknown,
        expired, already used) or the class (the message carries the coordinator's
        reason), or answers with a device id that is not this key's.
    """
    if not token:
        raise ValueError("token: must be non-empty")
    if not device_class:
        raise ValueError("device_class: must be non-empty")
    existing = state.load_enrolment()
    if existing is not None:
        raise AgentError(
            f"already enrolled as device {existing.device_id} (class "
            f"{existing.device_class}) with {existing.coordinator}; to enrol again, "
            f"remove {state.enrolment_path} and {state.identity_path}"
        )
    key = state.identity_key(create=True)
    public = raw_public_key(key)
    request = edge_pb2.EnrollRequest(
        token=token,
        identity_public_key=public,
        device_class=device_class,
        client_version=__version__,
    )
    # Over TLS without a configured client certificate, ask for one: a TLS key made
    # here, its CSR, and the identity key's proof binding the CSR to it and the token.
    pair: IssuedPair | None = None
    if rpc.credentials is not None and rpc.credentials.cert_pem is None:
        pair = DeviceCertificate.request(device_id_for(public))
        request.tls_csr = pair.csr_der
        request.tls_csr_proof = csr_proof(key, pair.csr_der, token=token)
    try:
        response = await rpc.call(
            "Enroll",
            request,
            response_type=edge_pb2.EnrollResponse,
            sign=False,
            in_task=False,
        )
    except grpc.aio.AioRpcError as exc:
        raise AgentError(f"enrolment refused ({exc.code().name}): {exc.details()}") from None
    except TLSFailure:
        raise
    except AgentError as exc:
        raise AgentError(f"enrolment refused: {exc}") from None
    expected = device_id_for(public)
    if response.device_id != expected:
        raise AgentError(
            f"coordinator assigned device id {response.device_id!r}, but this key's id "
            f"is {expected!r}; refusing the enrolment"
        )
    if pair is not None and response.client_certificate_pem:
        certificate = DeviceCertificate(state)
        certificate.install(pair, bytes(response.client_certificate_pem), device_id=expected)
        await rpc.use_credentials(certificate.channel(rpc.credentials))
    enrolment = EdgeState.new_enrolment(
        device_id=response.device_id,
        device_class=response.device_class.name or device_class,
        rank=int(response.device_class.rank),
        r_max=int(response.r_max),
        coordinator=rpc.target,
        now=rpc.clock.time(),
    )
    state.save_enrolment(enrolment)
    logger.info(
        "enrolled as device %s (class %s, rank %d, r_max %d)",
        enrolment.device_id,
        enrolment.device_class,
        enrolment.rank,
        enrolment.r_max,
    )
    return dataclasses.asdict(enrolment)
