"""A small fleet environment shared by the fleet simulator's tests (tiny preset, inline)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fleet_helpers import HAND_TRACE, small_env

from simulation.fleet.policies import FleetEnv


@pytest.fixture(scope="module")
def hand_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetEnv]:
    env = small_env(
        tmp_path_factory.mktemp("hand"),
        HAND_TRACE,
        devices=3,
        buffer_size=3,
        target_staleness=1.0,
        cohort_min=3,
        cohort_max=3,
        formation_s=0.0,
        sync_clients=3,
        sync_over_selection=0.0,
        max_updates=3,
        duration_s=600.0,
    )
    yield env
    env.trainer.close()
