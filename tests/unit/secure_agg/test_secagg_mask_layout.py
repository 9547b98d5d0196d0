"""The mask derivation: one AES-CTR stream per seed, each tensor's mask a slice of it.

Protocol version 2 derives all of a seed's tensor masks from ONE stream (key = the seed, counter
block hashed from the layout), the tensors laid end to end in name order. These tests pin that
layout on the crypto wrapper and on a real client, and check that sessions of many tensors
still unmask exactly under any dropouts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from secure_agg import (
    Client,
    CohortAborted,
    FixedPoint,
    Server,
    SessionConfig,
    Stage,
    crypto,
    run_local,
)
from secure_agg.constants import MASK_CHUNK_ELEMENTS, PROTOCOL_VERSION
from secure_agg.errors import MalformedMessage
from secure_agg.messages import MaskedInput, decode
from secure_agg.numerics import quantize, to_ring, unpack

TENSORS = (("lora.1.B", 7), ("lora.0.B", 5), ("lora.10.B", MASK_CHUNK_ELEMENTS + 11))
"""Given out of name order; the last crosses a chunk boundary of the generator."""


def _aes_ctr(seed: bytes, nonce: bytes, length: int) -> npt.NDArray[np.uint32]:
    """``length`` uint32 of AES-256-CTR keystream, computed without the wrapper."""
    data = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor().update(bytes(4 * length))
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


def test_tensors_are_laid_out_in_name_order_without_gaps_or_overlap() -> None:
    layout = crypto.mask_layout(TENSORS)
    assert [name for name, _ in layout.tensors] == ["lora.0.B", "lora.1.B", "lora.10.B"]
    assert layout.offsets == (0, 5, 12)
    assert layout.total == 12 + MASK_CHUNK_ELEMENTS + 11
    covered = np.zeros(layout.total, dtype=np.int64)
    for (_, length), start in zip(layout.tensors, layout.offsets, strict=True):
        covered[start : start + length] += 1
    assert covered.min() == 1 and covered.max() == 1  # every element in exactly one tensor
    # The order the tensors were given in does not matter; their names and lengths do.
    assert crypto.mask_layout(reversed(TENSORS)) == layout
    assert crypto.mask_layout([*TENSORS[:2], ("lora.10.B", 3)]).nonce != layout.nonce
    assert (
        crypto.mask_layout([("a", 5), ("b", 7)]).nonce
        != crypto.mask_layout([("a", 7), ("b", 5)]).nonce
    )


def test_every_tensor_mask_is_a_slice_of_the_one_stream_of_its_seed() -> None:
    # Prepare
    layout = crypto.mask_layout(TENSORS)
    seed = os.urandom(32)
    whole = _aes_ctr(seed, layout.nonce, layout.total)
    # Execute
    masks = layout.split(crypto.mask_stream(seed, layout=layout))
    # Assert: slice i of the single stream, and no two tensors reuse a keystream value.
    for (name, length), start in zip(layout.tensors, layout.offsets, strict=True):
        assert np.array_equal(masks[name], whole[start : start + length]), name
    joined = np.concatenate([masks[name] for name, _ in layout.tensors])
    assert np.array_equal(joined, whole)


def test_add_masks_refuses_an_accumulator_of_another_layout() -> None:
    layout = crypto.mask_layout(TENSORS)
    with pytest.raises(ValueError, match="elements"):
        crypto.add_masks(np.zeros(layout.total - 1, dtype=np.uint32), [], layout=layout)
    with pytest.raises(ValueError, match="uint32"):
        crypto.add_masks(np.zeros(layout.total, dtype=np.int64), [], layout=layout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate"):
        crypto.mask_layout([("a", 1), ("a", 2)])


def _session(n: int) -> tuple[SessionConfig, list[Client], Server]:
    config = SessionConfig(
        cohort=b"layout-cohort",
        cohort_size=n,
        threshold=n // 2 + 1,
        tensors=TENSORS,
        fixed_point=FixedPoint.for_cohort(n, bits=24, clip=1.0),
    )
    clients = [Client(i, config=config) for i in range(n)]
    return config, clients, Server(config, members=range(n))


def _deliver(server: Server, clients: list[Client]) -> None:
    for recipient, data in server.drain_encoded():
        reply = clients[recipient].handle(data)
        if reply is not None:
            server.handle(recipient, reply.encode())


def test_a_client_masks_all_tensors_with_one_cipher_per_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a session up to the share relay; count the AES contexts masking opens.
    n = 4
    config, clients, server = _session(n)
    for i, client in enumerate(clients):
        server.handle(i, client.advertise().encode())
    _deliver(server, clients)  # key broadcast -> ShareKeys
    _deliver(server, clients)  # share relay
    rng = np.random.default_rng(0)
    update = {name: rng.uniform(-0.1, 0.1, size=length) for name, length in TENSORS}
    opened: list[bytes] = []
    real_cipher = crypto.Cipher

    def counting_cipher(algorithm: Any, mode: Any) -> Any:
        opened.append(bytes(mode.nonce))
        return real_cipher(algorithm, mode)

    monkeypatch.setattr(crypto, "Cipher", counting_cipher)
    # Execute
    masked = decode(clients[0].submit(update, rng=np.random.default_rng(1)).encode())
    # Assert: one self-mask seed and n - 1 pairwise seeds, one stream each, from one block.
    assert isinstance(masked, MaskedInput)
    layout = config.layout
    assert opened == [layout.nonce] * n
    # The upload minus the quantised update is Σ ± stream(seed), sliced per tensor.
    me = clients[0]
    seeds = [(me._seed, 1)] + [
        (crypto.pairwise_seed(me._mask_shared[p], session=me.session, a=0, b=p), 1)
        for p in range(1, n)  # client 0 is below every peer: it adds their pairwise masks
    ]
    assert all(seed is not None for seed, _ in seeds)
    total = np.zeros(layout.total, dtype=np.uint64)
    for seed, _ in seeds:
        assert seed is not None
        total += _aes_ctr(seed, layout.nonce, layout.total)
    expected_masks = layout.split((total % 2**32).astype(np.uint32))
    quantised = quantize(
        update, fixed_point=config.fixed_point, weight=1.0, rng=np.random.default_rng(1)
    )
    bits = config.fixed_point.bits
    assert [name for name, _ in masked.tensors] == [name for name, _ in layout.tensors]
    for name, data in masked.tensors:
        values = unpack(data, bits=bits, length=expected_masks[name].size)
        plain = to_ring(quantised[name], bits=bits)
        want = (plain.astype(np.uint64) + expected_masks[name]) % 2**bits
        assert np.array_equal(values, want.astype(np.uint32)), name


def test_a_message_of_another_protocol_version_is_refused_naming_both() -> None:
    _, clients, _ = _session(3)
    data = bytearray(clients[0].advertise().encode())
    assert data[2] == PROTOCOL_VERSION == 2
    data[2] = 1  # what a build of the one-stream-per-tensor derivation sends
    with pytest.raises(MalformedMessage, match="version 1.*speaks only 2"):
        decode(bytes(data))


DROP_STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 7),
    lengths=st.dictionaries(
        st.text("abcxyz.0123456789", min_size=1, max_size=6),
        st.integers(1, 60),
        min_size=1,
        max_size=5,
    ),
    bits=st.integers(16, 32),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_many_tensor_sessions_unmask_exactly_under_any_dropouts(
    n: int, lengths: Mapping[str, int], bits: int, seed: int, data: st.DataObject
) -> None:
    # Prepare: every client sends the same tensors; some drop out at random stages.
    t = data.draw(st.integers(n // 2 + 1, n))
    # At most one dropout more than the session can bear: most sessions complete.
    drop = data.draw(
        st.dictionaries(st.integers(0, n - 1), st.sampled_from(DROP_STAGES), max_size=n - t + 1)
    )
    rng = np.random.default_rng(seed)
    inputs = [
        {name: rng.normal(scale=0.2, size=length) for name, length in lengths.items()}
        for _ in range(n)
    ]
    alive = [sum(1 for i in range(n) if drop.get(i, Stage.COMPLETED) > s) for s in DROP_STAGES]
    # Execute / Assert
    if min(alive) < t:
        event("aborted")
        with pytest.raises(CohortAborted):
            run_local(inputs, threshold=t, clip=1.0, bits=bits, drop=drop, seed=seed)
        return
    result = run_local(inputs, threshold=t, clip=1.0, bits=bits, drop=drop, seed=seed)
    survivors = [i for i in range(n) if drop.get(i, Stage.COMPLETED) > Stage.MASKED_INPUT]
    assert list(result.survivors) == survivors
    assert isinstance(result.integer_sum, dict)
    for name, length in lengths.items():
        expected = np.zeros(length, dtype=np.int64)
        for i in survivors:
            q = quantize(
                inputs[i],
                fixed_point=result.fixed_point,
                weight=1.0,
                rng=np.random.default_rng([seed, i]),
            )
            expected += q[name]
        assert np.array_equal(result.integer_sum[name], expected), name
