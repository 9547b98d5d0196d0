"""Tasks carry the columns of B their member trains (training.column_rule) and the warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_fixtures import Fed, report_trained, tasks_for, training_for
from torch import nn

from coordinator.service import TaskOffer
from estuary.adapters import owned_columns

TRAINING = {"local_steps": 1, "batch_size": 2, "seq_len": 16, "grad_clip_norm": 1.0}


def test_rotating_training_tasks_train_blocks_that_cover_every_column(
    tmp_path: Path, base: nn.Module
) -> None:
    # Prepare: r_max 4; phones train rank 2, laptops rank 4 (service_fixtures).
    fed = Fed(tmp_path, base, training=TRAINING)
    assert fed.settings.training.column_rule == "rotating"  # the default

    # Execute: as many training tasks of each class as the pacer admits at once.
    devices = [fed.device("phone") for _ in range(9)]
    phones = training_for(fed, devices)
    laptops = training_for(fed, [fed.device("laptop") for _ in range(2)])

    # Assert: each phone a block of 2 of the 4 columns that owned_columns gives for its
    # version and some member number; the blocks of the tasks cover every column; full-rank
    # laptops train every column, sent as the empty (nested) list.
    assert len(phones) >= 8
    blocks = {owned_columns(2, 4, version=o.version, member=m) for o in phones for m in (0, 1)}
    assert all(o.columns in blocks for o in phones)
    assert {c for o in phones for c in o.columns} == {0, 1, 2, 3}
    assert all(o.columns == () for o in laptops)
    # The cohort task names no columns: the member trained already.
    report_trained(fed, devices, phones)
    fed.service.tick()
    cohort = report_trained(fed, devices, phones)
    assert all(isinstance(o, TaskOffer) and not o.is_training for o in cohort), cohort
    assert all(isinstance(o, TaskOffer) and o.columns == () for o in cohort)


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

    offers = training_for(fed, [fed.device("laptop") for _ in range(3)])

    assert [o.warmup_steps for o in offers] == [warmup] * 3


def test_a_negative_warmup_is_refused_by_name() -> None:
    from pydantic import ValidationError

    from estuary.config.models import TrainingSettings

    with pytest.raises(ValidationError, match="warmup_steps"):
        TrainingSettings(warmup_steps=-1)


def test_the_grpc_task_carries_columns_and_warmup(tmp_path: Path, base: nn.Module) -> None:
    from coordinator.grpc_service import _task

    fed = Fed(tmp_path, base, training={**TRAINING, "warmup_steps": 3})
    offer = training_for(fed, [fed.device("phone") for _ in range(3)])[1]

    task = _task(offer)

    assert list(task.columns) == list(offer.columns) and len(task.columns) == 2
    assert task.warmup_steps == 3
    assert not task.cohort_id and not task.HasField("secagg")
