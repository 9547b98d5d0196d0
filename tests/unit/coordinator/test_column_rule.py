"""Tasks carry the columns of B their member trains (training.column_rule) and the warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_fixtures import Fed, tasks_for
from torch import nn

from estuary.adapters import owned_columns

TRAINING = {"local_steps": 1, "batch_size": 2, "seq_len": 16, "grad_clip_norm": 1.0}


def test_rotating_members_of_a_cohort_train_disjoint_blocks_that_move_with_the_version(
    tmp_path: Path, base: nn.Module
) -> None:
    # Prepare: r_max 4; phones train rank 2, laptops rank 4 (service_fixtures).
    fed = Fed(tmp_path, base, training=TRAINING)
    assert fed.settings.training.column_rule == "rotating"  # the default

    # Execute: a cohort of each class.
    phones = tasks_for(fed, [fed.device("phone") for _ in range(3)])
    laptops = tasks_for(fed, [fed.device("laptop") for _ in range(3)])

    # Assert: each phone its block of 2 of the 4 columns (members 0 and 1 disjoint,
    # member 2 back on member 0's block), as owned_columns says for the cohort's version;
    # full-rank laptops train every column, sent as the empty (nested) list.
    assert [o.columns for o in phones] == [
        owned_columns(2, 4, version=o.version, member=o.member_index) for o in phones
    ]
    assert set(phones[0].columns).isdisjoint(phones[1].columns)
    assert phones[0].columns == phones[2].columns
    assert all(o.columns == () for o in laptops)


def test_nested_rule_hands_out_no_columns(tmp_path: Path, base: nn.Module) -> None:
    fed = Fed(tmp_path, base, training={**TRAINING, "column_rule": "nested"})

    phones = tasks_for(fed, [fed.device("phone") for _ in range(3)])

    assert all(o.columns == () for o in phones)


def test_an_unknown_rule_is_refused_by_name() -> None:
    from pydantic import ValidationError

    from estuary.config.models import TrainingSettings

    with pytest.raises(ValidationError, match="column_rule"):
        TrainingSettings(column_rule="diagonal")  # type: ignore[arg-type]


@pytest.mark.parametrize("warmup", [0, 4])
def test_tasks_carry_the_warmup(tmp_path: Path, base: nn.Module, warmup: int) -> None:
    fed = Fed(tmp_path, base, training={**TRAINING, "warmup_steps": warmup})

    offers = tasks_for(fed, [fed.device("laptop") for _ in range(3)])

    assert [o.warmup_steps for o in offers] == [warmup] * 3


def test_a_negative_warmup_is_refused_by_name() -> None:
    from pydantic import ValidationError

    from estuary.config.models import TrainingSettings

    with pytest.raises(ValidationError, match="warmup_steps"):
        TrainingSettings(warmup_steps=-1)


def test_the_grpc_task_carries_columns_and_warmup(tmp_path: Path, base: nn.Module) -> None:
    from coordinator.grpc_service import _task

    fed = Fed(tmp_path, base, training={**TRAINING, "warmup_steps": 3})
    offer = tasks_for(fed, [fed.device("phone") for _ in range(3)])[1]

    task = _task(offer)

    assert list(task.columns) == list(offer.columns) and len(task.columns) == 2
    assert task.warmup_steps == 3
