"""A device the pacer defers asks again when the shipped agent would: after the pacer's
retry-after, which grows with the devices already waiting, stretched by the agent's jitter.

The simulator once brought every deferred device back after a fixed 120 s, so the herd
deferred at time 0 came back all at once (issue 13); a real agent honours its retry-after.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fleet_helpers import HAND_TRACE, small_env

from edge_client.agent import PACE_JITTER
from simulation.fleet.policies import EstuaryPolicy, FedBuffPolicy, FleetEnv, expected_task_s


@pytest.fixture(scope="module")
def herd_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetEnv]:
    # 20 always-online laptops ask at time 0; the cap is K × target = 3 × 1.
    env = small_env(
        tmp_path_factory.mktemp("herd"),
        HAND_TRACE,
        devices=20,
        buffer_size=3,
        target_staleness=1.0,
        cohort_min=3,
        cohort_max=3,
        formation_s=0.0,
        max_updates=3,
        duration_s=600.0,
    )
    yield env
    env.trainer.close()


def test_fedbuff_puts_each_deferred_device_behind_the_ones_before_it(herd_env: FleetEnv) -> None:
    # Prepare: a slot frees every T / 3 s (T = 1 step of 2 s + 10 s of messages).
    task = expected_task_s(herd_env.config, herd_env.trace, "laptop")
    assert task == 12.0
    policy = FedBuffPolicy(herd_env)
    policy.start()

    # Execute: only what happens at time 0.
    policy.q.run(until=0.0, stop=lambda: False)

    # Assert: 3 train, 17 are deferred, the n-th after n turns of T / 3 (with jitter).
    assert policy.active == 3
    assert policy.queue.waiting() == 17
    turns = sum(n * task / 3 for n in range(1, 18))
    waited = policy.rec.waits["pacing"]
    assert turns <= waited <= turns * (1 + PACE_JITTER)


def test_estuary_defers_with_the_services_retry_after_and_the_agents_jitter(
    herd_env: FleetEnv,
) -> None:
    policy = EstuaryPolicy(herd_env)
    policy.start()
    told: list[float] = []
    original = policy.service.get_task

    def recording(device: object) -> object:
        offer = original(device)  # type: ignore[arg-type]
        if getattr(offer, "mechanism", None) == "pacing":
            told.append(offer.retry_after_s)  # type: ignore[union-attr]
        return offer

    policy.service.get_task = recording  # type: ignore[method-assign]

    policy.q.run(until=0.0, stop=lambda: False)

    # 3 admitted (the cap), 17 deferred one behind the other; each waits what it was told
    # stretched by at most the agent's jitter, not a fixed check-in period.
    assert told == pytest.approx([n * 12.0 / 3 for n in range(1, 18)])
    waited = policy.rec.waits["pacing"]
    assert sum(told) <= waited <= sum(told) * (1 + PACE_JITTER)
    assert policy.service.admission.queue.waiting() == 17


def test_a_floor_on_check_ins_holds_a_deferred_device_back(herd_env: FleetEnv) -> None:
    from dataclasses import replace

    env = replace(herd_env, config=replace(herd_env.config, idle_checkin_s=120.0))
    policy = FedBuffPolicy(env)
    policy.start()
    policy.q.run(until=0.0, stop=lambda: False)
    assert policy.rec.waits["pacing"] == pytest.approx(17 * 120.0)
