"""estuary.auth: the one signing rule, from sign_message to verify_request.

A request signed with :func:`sign_message` must verify with :func:`verify_request` on
what a verifier reads back (:func:`signed_auth_from`, :func:`request_body_sha256`), and
nothing else may: another body, another method, another key, a stale timestamp.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from estuary import auth as auth_module
from estuary.auth import (
    MAX_CLOCK_SKEW_MS,
    NONCE_BYTES,
    AuthError,
    SignedAuth,
    device_id_for,
    raw_public_key,
    request_body_sha256,
    sign_message,
    signed_auth_from,
    verify_request,
)
from estuary.proto.v1 import common_pb2, edge_pb2

KEY = Ed25519PrivateKey.generate()
PUBLIC = raw_public_key(KEY)
NOW_MS = 1_700_000_000_000

METHODS = ["GetTask", "FetchArtifact", "SendSecAgg", "AwaitSecAgg", "UploadMasked", "Heartbeat"]
DIGESTS = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)

#: Every signed request type, with arbitrary content.
REQUESTS = st.one_of(
    st.builds(
        edge_pb2.GetTaskRequest,
        held_version=st.integers(min_value=0, max_value=2**32 - 1),
        held_artifacts=st.lists(DIGESTS, max_size=3),
    ),
    st.builds(
        edge_pb2.FetchArtifactRequest,
        sha256=DIGESTS,
        offset=st.integers(min_value=0, max_value=2**40),
    ),
    st.builds(
        edge_pb2.SecAggClientMessage,
        cohort_id=st.text(max_size=20),
        payload=st.binary(max_size=200),
    ),
    st.builds(edge_pb2.HeartbeatRequest, task_id=st.text(max_size=20)),
    st.builds(
        edge_pb2.UploadHeader,
        task_id=st.text(max_size=20),
        total_bytes=st.integers(min_value=0, max_value=2**40),
        sha256=DIGESTS,
    ),
)


def verify(request: Any, method: str, *, now_ms: int = NOW_MS, public: bytes = PUBLIC) -> None:
    verify_request(
        signed_auth_from(request),
        public_key=public,
        method=method,
        body_sha256=request_body_sha256(request),
        now_ms=now_ms,
    )


@settings(max_examples=50)
@given(request=REQUESTS, method=st.sampled_from(METHODS), timestamp_ms=st.integers(1, 2**50))
def test_signed_request_verifies_on_what_a_verifier_reads_back(
    request: Any, method: str, timestamp_ms: int
) -> None:
    signed = sign_message(request, private_key=KEY, method=method, timestamp_ms=timestamp_ms)

    assert signed is request  # signed in place, returned for chaining
    auth = signed_auth_from(request)
    assert auth.device_id == device_id_for(PUBLIC)
    assert auth.timestamp_ms == timestamp_ms and len(auth.nonce) == NONCE_BYTES
    verify(request, method, now_ms=timestamp_ms)


@settings(max_examples=50)
@given(request=REQUESTS, method=st.sampled_from(METHODS))
def test_body_hash_ignores_auth_and_leaves_the_request_alone(request: Any, method: str) -> None:
    unsigned = request.SerializeToString()
    before = request_body_sha256(request)

    sign_message(request, private_key=KEY, method=method, timestamp_ms=NOW_MS)
    signed = request.SerializeToString()

    assert request_body_sha256(request) == before == hashlib.sha256(unsigned).digest()
    assert request.SerializeToString() == signed  # hashing took a copy
    assert request.HasField("auth")


@settings(max_examples=50)
@given(
    held_version=st.integers(min_value=0, max_value=2**32 - 1),
    other=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_a_tampered_body_fails(held_version: int, other: int) -> None:
    request = edge_pb2.GetTaskRequest(held_version=held_version)
    sign_message(request, private_key=KEY, method="GetTask", timestamp_ms=NOW_MS)

    request.held_version = other

    if other == held_version:
        verify(request, "GetTask")
    else:
        with pytest.raises(AuthError, match="signature does not verify"):
            verify(request, "GetTask")


@given(signed_for=st.sampled_from(METHODS), checked_as=st.sampled_from(METHODS))
def test_a_signature_is_bound_to_its_method(signed_for: str, checked_as: str) -> None:
    request = edge_pb2.HeartbeatRequest(task_id="t1")
    sign_message(request, private_key=KEY, method=signed_for, timestamp_ms=NOW_MS)

    if signed_for == checked_as:
        verify(request, checked_as)
    else:
        with pytest.raises(AuthError, match="signature does not verify"):
            verify(request, checked_as)


def test_another_device_key_and_a_stale_timestamp_fail() -> None:
    request = edge_pb2.GetTaskRequest(held_version=1)
    sign_message(request, private_key=KEY, method="GetTask", timestamp_ms=NOW_MS)

    with pytest.raises(AuthError, match="does not match the enrolled public key"):
        verify(request, "GetTask", public=raw_public_key(Ed25519PrivateKey.generate()))
    with pytest.raises(AuthError, match="away from the server clock"):
        verify(request, "GetTask", now_ms=NOW_MS + MAX_CLOCK_SKEW_MS + 1)
    verify(request, "GetTask", now_ms=NOW_MS + MAX_CLOCK_SKEW_MS)  # the edge is inside


def test_resigning_replaces_the_nonce_and_the_old_signature() -> None:
    request = edge_pb2.FetchArtifactRequest(sha256="ab" * 32, offset=7)
    sign_message(request, private_key=KEY, method="FetchArtifact", timestamp_ms=NOW_MS)
    first = signed_auth_from(request)

    sign_message(request, private_key=KEY, method="FetchArtifact", timestamp_ms=NOW_MS + 5)
    second = signed_auth_from(request)

    assert second.nonce != first.nonce and second.signature != first.signature
    assert second.timestamp_ms == NOW_MS + 5
    verify(request, "FetchArtifact", now_ms=NOW_MS + 5)
    # The old signature stays valid with its own nonce (refusing its replay is the
    # verifier's nonce memory), but it cannot be moved onto the new nonce.
    body = request_body_sha256(request)
    verify_request(
        first, public_key=PUBLIC, method="FetchArtifact", body_sha256=body, now_ms=NOW_MS
    )
    moved = SignedAuth(first.device_id, first.timestamp_ms, second.nonce, first.signature)
    with pytest.raises(AuthError, match="signature does not verify"):
        verify_request(
            moved, public_key=PUBLIC, method="FetchArtifact", body_sha256=body, now_ms=NOW_MS
        )


def test_missing_auth_is_refused_by_name() -> None:
    with pytest.raises(AuthError, match="^auth: missing; every request but Enroll"):
        signed_auth_from(edge_pb2.GetTaskRequest(held_version=1))


@pytest.mark.parametrize(
    ("fields", "missing"),
    [
        ({}, "device_id, timestamp_ms, nonce, signature"),
        ({"device_id": "d"}, "timestamp_ms, nonce, signature"),
        ({"device_id": "d", "timestamp_ms": 1, "nonce": b"n"}, "signature"),
        ({"timestamp_ms": 1, "nonce": b"n", "signature": b"s"}, "device_id"),
        ({"device_id": "d", "nonce": b"n", "signature": b"s"}, "timestamp_ms"),
    ],
)
def test_empty_auth_fields_are_named(fields: dict[str, Any], missing: str) -> None:
    request = edge_pb2.HeartbeatRequest(task_id="t", auth=common_pb2.DeviceAuth(**fields))

    with pytest.raises(AuthError, match=f"^auth: missing {missing}$"):
        signed_auth_from(request)


@given(
    device_id=st.text(min_size=1, max_size=40),
    timestamp_ms=st.integers(min_value=1, max_value=2**62),
    nonce=st.binary(min_size=1, max_size=32),
    signature=st.binary(min_size=1, max_size=64),
)
def test_signed_auth_round_trips_through_the_wire(
    device_id: str, timestamp_ms: int, nonce: bytes, signature: bytes
) -> None:
    auth = SignedAuth(device_id, timestamp_ms, nonce, signature)
    request = edge_pb2.AwaitSecAggRequest(cohort_id="c", auth=auth.to_proto())
    wire = edge_pb2.AwaitSecAggRequest.FromString(request.SerializeToString())

    assert signed_auth_from(wire) == auth


def test_unsigned_message_types_are_refused() -> None:
    with pytest.raises(ValueError):
        request_body_sha256(edge_pb2.EnrollRequest(token="t"))
    with pytest.raises(ValueError):
        sign_message(
            edge_pb2.EnrollRequest(token="t"), private_key=KEY, method="Enroll", timestamp_ms=1
        )


def test_a_device_key_is_parsed_once_and_every_signature_still_checked() -> None:
    key = Ed25519PrivateKey.generate()
    public = raw_public_key(key)
    parsed = auth_module._verifier.cache_info().misses
    for n in range(3):
        request = edge_pb2.GetTaskRequest(held_version=n)
        sign_message(request, private_key=key, method="GetTask", timestamp_ms=NOW_MS)
        verify(request, "GetTask", public=public)
        forged = edge_pb2.GetTaskRequest()
        forged.CopyFrom(request)
        forged.held_version = n + 1  # the signature covers the body: this must fail
        with pytest.raises(AuthError, match="signature does not verify"):
            verify(forged, "GetTask", public=public)
    assert auth_module._verifier.cache_info().misses == parsed + 1
