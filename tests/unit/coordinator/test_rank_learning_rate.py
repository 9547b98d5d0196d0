"""Tasks carry a learning rate scaled by the class's rank (training.rank_lr_power)."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_fixtures import Fed, tasks_for
from torch import nn

TRAINING = {"local_steps": 1, "batch_size": 2, "seq_len": 16, "grad_clip_norm": 1.0}


@pytest.mark.parametrize(("power", "phone_lr"), [(1.0, 0.02), (0.5, 0.01 * 2**0.5), (0.0, 0.01)])
def test_a_lower_rank_class_is_handed_a_larger_learning_rate(
    tmp_path: Path, base: nn.Module, power: float, phone_lr: float
) -> None:
    # Prepare: r_max 4; phones train rank 2, laptops rank 4 (service_fixtures).
    fed = Fed(
        tmp_path,
        base,
        training={**TRAINING, "learning_rate": 0.01, "rank_lr_power": power},
    )

    # Execute: a cohort of each class.
    phones = tasks_for(fed, [fed.device("phone") for _ in range(3)])
    laptops = tasks_for(fed, [fed.device("laptop") for _ in range(3)])

    # Assert: phones at lr · (4 / 2)^power, full-rank laptops at lr, as float32 travels.
    assert {o.rank for o in phones} == {2} and {o.rank for o in laptops} == {4}
    assert all(o.learning_rate == pytest.approx(phone_lr) for o in phones)
    assert all(o.learning_rate == pytest.approx(0.01) for o in laptops)
