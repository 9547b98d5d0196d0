"""The simulator runs the system as shipped: its timing defaults are the product's."""

from __future__ import annotations

import pytest

from edge_client.training import HEARTBEAT_S
from estuary.config.models import CohortSettings, PacingSettings
from simulation.fleet.policies import FleetConfig


def test_the_simulator_uses_the_products_timing_defaults() -> None:
    # A member waiting for its cohort to seal polls at pacing.retry_after_min_s; a cohort
    # at min_size waits formation_s; a silent member is noticed after silence_s; agents
    # heartbeat every HEARTBEAT_S while training; the service's periodic work (seal,
    # deadlines, fold in, commit) runs every TICK_INTERVAL_S. Each second more costs
    # Estuary per task where a task trains for seconds (issue 13).
    from coordinator.server import TICK_INTERVAL_S

    config, cohort = FleetConfig(), CohortSettings()
    assert config.tick_s == TICK_INTERVAL_S
    assert config.retry_after_s == PacingSettings().retry_after_min_s
    assert config.formation_s == cohort.formation_s
    assert config.silence_s == cohort.silence_s
    assert config.key_timeout_s == cohort.key_timeout_s
    assert config.heartbeat_s == HEARTBEAT_S


def test_the_simulator_trains_as_the_product_does() -> None:
    # Every policy trains with the product's rank-rate power, column rule and warm-up.
    from estuary.config.models import TrainingSettings

    config, training = FleetConfig(), TrainingSettings()
    assert config.rank_lr_power == training.rank_lr_power
    assert config.column_rule == training.column_rule
    assert config.warmup_steps == training.warmup_steps


def test_a_negative_warmup_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="warmup_steps: must be >= 0, got -2"):
        FleetConfig(warmup_steps=-2)


def test_a_pacer_cap_below_a_cohort_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="^target_staleness: .* fewer than cohort_min=5"):
        FleetConfig(buffer_size=4, target_staleness=1.0)
