from __future__ import annotations

import numpy as np
import pytest

from coordinator.cohort_log import CohortEvent, ReplicatedCohort
from estuary.state.memory import MemoryStore
from secure_agg import Client, FixedPoint, Server, SessionConfig, Stage

N, T, M = 5, 3, 64


def _config() -> SessionConfig:
    return SessionConfig(
        cohort=b"cohort-1",
        cohort_size=N,
        threshold=T,
        tensors=(("b", M),),
        fixed_point=FixedPoint.for_cohort(N, bits=32, clip=10.0),
    )


def _replica(store: MemoryStore) -> ReplicatedCohort:
    config = _config()
    return ReplicatedCohort(store, "cohort-1", make_server=lambda: Server(config, members=range(N)))


def _run(
    replicas: list[ReplicatedCohort],
    updates: list[np.ndarray],
    weights: list[float],
    *,
    drop_before_upload: set[int] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Drive clients through the protocol, alternating replicas for every call."""
    config = _config()
    clients = [Client(i, config=config) for i in range(N)]
    turn = iter(range(10_000))

    def pick() -> ReplicatedCohort:
        return replicas[next(turn) % len(replicas)]

    for i, client in enumerate(clients):
        assert pick().submit_message(i, client.advertise().encode()).error is None
    seen = {i: Stage.ADVERTISE_KEYS for i in range(N)}
    submitted: set[int] = set()
    for _ in range(10):
        progressed = False
        for i, client in enumerate(clients):
            if i in drop_before_upload and seen[i] >= Stage.MASKED_INPUT:
                continue
            for stage, data in pick().messages_for(i, after=seen[i]):
                seen[i] = stage
                progressed = True
                reply = client.handle(data)
                if stage is Stage.MASKED_INPUT:
                    if i in drop_before_upload:
                        break
                    pick().assign_weight(i, weights[i])
                    submitted.add(i)
                    reply = client.submit(
                        {"b": updates[i]}, weight=weights[i], rng=np.random.default_rng(i)
                    )
                if reply is not None:
                    outcome = pick().submit_message(i, reply.encode())
                    assert outcome.error is None, outcome
        replicas[0].sync()
        if replicas[0].stage is Stage.MASKED_INPUT and drop_before_upload:
            alive = {i for i in range(N) if i not in drop_before_upload}
            if submitted >= alive:  # the upload deadline passes without the dropped ones
                pick().close_stage_if(Stage.MASKED_INPUT)
                progressed = True
        if not progressed:
            break


def test_two_replicas_share_one_cohort_and_agree() -> None:
    store = MemoryStore()
    a, b = _replica(store), _replica(store)
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-1, 1, M) for _ in range(N)]
    weights = [1.0, 0.5, 0.25, 1.0, 0.75]

    _run([a, b], updates, weights)

    a.sync()
    b.sync()
    assert a.stage is Stage.COMPLETED and b.stage is Stage.COMPLETED
    assert a.server.result is not None and b.server.result is not None
    expected = sum(w * u for w, u in zip(weights, updates, strict=True))
    np.testing.assert_allclose(a.server.result.float_sum["b"], expected, atol=1e-3)
    np.testing.assert_array_equal(
        a.server.result.integer_sum["b"], b.server.result.integer_sum["b"]
    )
    assert a.server.result.weight_sum == pytest.approx(sum(weights))
    # A replica started after the fact (the others crashed) rebuilds the same result.
    late = _replica(store)
    late.sync()
    assert late.server.result is not None
    np.testing.assert_array_equal(
        late.server.result.integer_sum["b"], a.server.result.integer_sum["b"]
    )
    assert late.events() == a.events()


def test_dropout_before_upload_is_recovered_across_replicas() -> None:
    store = MemoryStore()
    replicas = [_replica(store), _replica(store), _replica(store)]
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-1, 1, M) for _ in range(N)]
    weights = [1.0] * N

    _run(replicas, updates, weights, drop_before_upload={1})

    r = replicas[2]
    r.sync()
    assert r.stage is Stage.COMPLETED, r.abort_reason
    assert r.server.result is not None
    assert r.server.result.survivors == (0, 2, 3, 4)
    expected = sum(updates[i] for i in (0, 2, 3, 4))
    np.testing.assert_allclose(r.server.result.float_sum["b"], expected, atol=1e-3)


def test_refusals_are_replicated_and_duplicates_not_counted() -> None:
    store = MemoryStore()
    a, b = _replica(store), _replica(store)
    config = _config()
    client = Client(0, config=config)
    advert = client.advertise().encode()
    assert a.submit_message(0, advert).error is None
    again = b.submit_message(0, advert)  # a retry of the same bytes: acknowledged, not re-applied
    assert again.duplicate and again.error is None and again.seq == 1
    other = b.submit_message(0, Client(0, config=config).advertise().encode())
    assert other.error_type == "DuplicateMessage"  # a different second advert: refused
    garbage = a.submit_message(3, b"\x00not a message")
    assert garbage.error is not None
    b.sync()
    assert a.events() == b.events() == 3
    assert b._replica.outcomes[2].error_type == "DuplicateMessage"


def test_deadline_closes_a_stage_once() -> None:
    store = MemoryStore()
    a, b = _replica(store), _replica(store)
    config = _config()
    for i in range(T):  # only t of n advertise
        a.submit_message(i, Client(i, config=config).advertise().encode())
    assert a.close_stage_if(Stage.ADVERTISE_KEYS) is not None
    assert b.close_stage_if(Stage.ADVERTISE_KEYS) is None  # b catches up first: moved on
    assert a.stage is Stage.SHARE_KEYS and b.stage is Stage.SHARE_KEYS
    assert len(b.messages_for(0, after=Stage.ADVERTISE_KEYS)) == 1


def test_event_encoding_round_trips_and_rejects_garbage() -> None:
    event = CohortEvent(3, client=7, stage=2, weight=0.25, payload=b"xyz")
    assert CohortEvent.decode(event.encode()) == event
    with pytest.raises(ValueError, match="shorter"):
        CohortEvent.decode(b"\x01")
    with pytest.raises(ValueError, match="unknown kind"):
        CohortEvent.decode(CohortEvent(9).encode())
