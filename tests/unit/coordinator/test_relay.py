"""The secure-aggregation relay against hostile members: only the offender leaves the cohort.

A member that advertises keys no honest client makes (a low-order point, a non-canonical
alias, another member's key, c_pk == s_pk) used to be accepted and relayed, and then every
honest member refused the key broadcast and aborted. Now the relay refuses the message,
the offender is dropped, and the honest members complete the cohort — in the default
active-adversary mode (where the offender signs its bad keys with its own valid identity)
and in passive mode. Time is a VirtualClock; nothing waits.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_fixtures import Fed, tasks_for

from coordinator.errors import FailedPrecondition
from secure_agg import Client, Stage, crypto
from secure_agg.messages import AdvertiseKeys, KeyBroadcast, decode

_LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")

Attack = Callable[[AdvertiseKeys, list[AdvertiseKeys]], AdvertiseKeys]

ATTACKS: dict[str, Attack] = {
    "low-order c_pk": lambda own, _: dataclasses.replace(own, c_pk=_LOW_ORDER),
    "all-zero s_pk": lambda own, _: dataclasses.replace(own, s_pk=bytes(32)),
    "non-canonical alias": lambda own, _: dataclasses.replace(
        own, c_pk=own.c_pk[:-1] + bytes([own.c_pk[-1] | 0x80])
    ),
    "c_pk == s_pk": lambda own, _: dataclasses.replace(own, s_pk=own.c_pk),
    "another member's keys": lambda own, honest: dataclasses.replace(
        own, c_pk=honest[0].c_pk, s_pk=honest[0].s_pk
    ),
}


def _signed(advert: AdvertiseKeys, fed: Fed, device_id: str, active: bool) -> AdvertiseKeys:
    """The offender signs its bad keys with its own, valid identity (active mode)."""
    if not active:
        return advert
    payload = crypto.advertise_payload(advert.cohort, advert.sender, advert.c_pk, advert.s_pk)
    return dataclasses.replace(advert, signature=crypto.sign(fed.identities[device_id], payload))


@pytest.mark.parametrize("active", [True, False], ids=["active", "passive"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_hostile_advertisement_drops_only_its_sender(
    tmp_path: Path, base: Any, attack: str, active: bool
) -> None:
    # Prepare: a cohort of 4 (t = 3); member 3 is hostile and advertises last.
    fed = Fed(
        tmp_path,
        base,
        cohort={
            "min_size": 4,
            "max_size": 4,
            "threshold_fraction": 0.6,
            "formation_s": 0.0,
            "active_adversary": active,
        },
    )
    service = fed.service
    devices = [fed.device("laptop") for _ in range(4)]
    offers = tasks_for(fed, devices)
    cohort_id = offers[0].cohort_id
    assert offers[0].session.active is active and offers[0].session.threshold == 3
    # Active mode: every task lists each member's enrolled identity key, in member order.
    enrolled = tuple(d.public_key for d in devices)
    assert all(o.identity_keys == (enrolled if active else ()) for o in offers)
    by_index = {o.member_index: d for o, d in zip(offers, devices, strict=True)}
    clients: dict[int, Client] = {
        o.member_index: fed.client(o, by_index[o.member_index]) for o in offers
    }
    adverts = {i: clients[i].advertise() for i in range(3)}
    for i in range(3):
        service.send_secagg(by_index[i], cohort_id, Stage.ADVERTISE_KEYS, adverts[i].encode())
    hostile = _signed(
        ATTACKS[attack](clients[3].advertise(), list(adverts.values())),
        fed,
        by_index[3].device_id,
        active,
    )

    # Execute: the relay refuses the hostile message, naming why.
    with pytest.raises(FailedPrecondition, match="message refused: .*client 3"):
        service.send_secagg(by_index[3], cohort_id, Stage.ADVERTISE_KEYS, hostile.encode())

    # Assert: no deadline was needed; the broadcast holds the three honest members only,
    # each of them accepts it, and the cohort completes with exactly their sum.
    assert service.cohort_stage(cohort_id) is Stage.SHARE_KEYS
    assert service.poll_secagg(by_index[3], cohort_id, Stage.ADVERTISE_KEYS) is None
    rng = np.random.default_rng(0)
    expected = {name: np.zeros(length) for name, length in offers[0].session.tensors}
    for i in range(3):
        reply = service.poll_secagg(by_index[i], cohort_id, Stage.ADVERTISE_KEYS)
        assert reply is not None and reply.stage is Stage.SHARE_KEYS
        broadcast = decode(reply.payload)
        assert isinstance(broadcast, KeyBroadcast)
        assert [e.client for e in broadcast.entries] == [0, 1, 2]
        out = clients[i].handle(reply.payload)
        assert out is not None
        service.send_secagg(by_index[i], cohort_id, Stage.SHARE_KEYS, out.encode())
    for i in range(3):
        reply = service.poll_secagg(by_index[i], cohort_id, Stage.SHARE_KEYS)
        assert reply is not None and reply.stage is Stage.MASKED_INPUT and reply.weight == 1.0
        clients[i].handle(reply.payload)
        update = {n: rng.uniform(-0.01, 0.01, m) for n, m in offers[0].session.tensors}
        for n in expected:
            expected[n] += update[n]
        masked = clients[i].submit(update, weight=reply.weight).encode()
        result = service.upload_masked(
            by_index[i],
            task_id=offers[i].task_id,
            cohort_id=cohort_id,
            payload=masked,
            sha256=hashlib.sha256(masked).hexdigest(),
        )
        assert result.accepted
    after = Stage.MASKED_INPUT
    if active:
        for i in range(3):
            reply = service.poll_secagg(by_index[i], cohort_id, after)
            assert reply is not None and reply.stage is Stage.CONSISTENCY_CHECK
            out = clients[i].handle(reply.payload)
            assert out is not None
            service.send_secagg(by_index[i], cohort_id, Stage.CONSISTENCY_CHECK, out.encode())
        after = Stage.CONSISTENCY_CHECK
    for i in range(3):
        reply = service.poll_secagg(by_index[i], cohort_id, after)
        assert reply is not None and reply.stage is Stage.UNMASKING
        out = clients[i].handle(reply.payload)
        assert out is not None
        service.send_secagg(by_index[i], cohort_id, Stage.UNMASKING, out.encode())
    cohort = service.cohorts.cohort(service.cohorts.record(cohort_id))  # type: ignore[arg-type]
    result = cohort.server.result
    assert result is not None and result.survivors == (0, 1, 2)
    step = 2.0 ** -offers[0].session.fixed_point.frac_bits
    for name, total in expected.items():
        assert np.max(np.abs(result.float_sum[name] - total)) <= 3 * step
    service.tick()
    record = service.cohorts.record(cohort_id)
    assert record is not None and record.status == "completed" and record.survivors == (0, 1, 2)


def test_a_secagg_plus_cohort_takes_its_threshold_from_the_neighbourhood(
    tmp_path: Path, base: Any
) -> None:
    # t was ceil(0.6 · n) = 4 for n = 6, more than the k + 1 = 3 holders of a secret, so the
    # session was refused the moment a member asked for its task.
    fed = Fed(
        tmp_path,
        base,
        cohort={"min_size": 6, "max_size": 6, "threshold_fraction": 0.6, "neighbours": 2},
    )
    offers = tasks_for(fed, [fed.device("laptop") for _ in range(6)])
    session = offers[0].session
    assert (session.neighbours, session.share_holders, session.threshold) == (2, 3, 2)
