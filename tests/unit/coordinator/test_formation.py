"""How many devices a class still needs: logged once per change, and shown by ``estuary status``.

Cohorts never mix device classes and need ``cohort.min_size`` devices of one class. The
service fixture's cohorts need 3 (min_size = max_size = 3), so two phones that trained
wait and a third's report seals their cohort at once.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from rich.console import Console
from service_fixtures import Fed, report_trained, training_for
from torch import nn

from coordinator.formation import FormationLog
from coordinator.service import PaceOffer, TaskOffer
from estuary.cli.status_render import render
from estuary.cli.status_report import build_report, collect_records

LOGGER = "coordinator.formation"


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_formation_log_says_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    formation = FormationLog(min_size=4)

    assert formation.observe({"phone": 0, "laptop": 0}) == {}
    assert formation.observe({"phone": 2, "laptop": 0}) == {"phone": 2}
    assert formation.observe({"phone": 2, "laptop": 0}) == {}
    assert formation.observe({"phone": 3, "laptop": 1}) == {"phone": 3, "laptop": 1}
    assert formation.observe({"phone": 0, "laptop": 1}) == {"phone": 0}

    assert _lines(caplog) == [
        "class phone: 2 waiting, needs 4",
        "class phone: 3 waiting, needs 4",
        "class laptop: 1 waiting, needs 4",
        "class phone: 0 waiting, needs 4",
    ]


def test_formation_log_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="min_size: must be >= 1, got 0"):
        FormationLog(min_size=0)
    with pytest.raises(ValueError, match=r"waiting\['phone'\]: must be >= 0, got -1"):
        FormationLog(min_size=2).observe({"phone": -1})


def test_tick_logs_waiting_devices_once_and_status_shows_them(
    tmp_path: Path, base: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    fed = Fed(tmp_path, base)
    caplog.set_level(logging.INFO, logger=LOGGER)
    phones = [fed.device("phone") for _ in range(3)]
    fed.device("laptop")

    # Prepare: two phones train and report: they wait in the forming cohort.
    training = training_for(fed, phones[:2])
    offers = report_trained(fed, phones[:2], training)
    for _ in range(4):
        fed.service.tick()
        fed.clock.advance(0.25)

    assert all(isinstance(o, PaceOffer) and o.mechanism == "cohort_formation" for o in offers)
    assert _lines(caplog) == ["class phone: 2 waiting, needs 3"]

    # `estuary status` reads the same from the store the coordinator wrote.
    report = build_report(collect_records(fed.store), now=fed.clock.time())
    rows = [(c.name, c.rank, c.enrolled, c.waiting, c.min_size) for c in report.classes]
    assert rows == [("phone", 2, 3, 2, 3), ("laptop", 4, 1, 0, 3)]
    console = Console(width=80, record=True, file=io.StringIO())
    render(report, console)
    text = console.export_text()
    assert ["phone", "2", "3", "2", "3"] in [line.split() for line in text.splitlines()]

    # The third phone trains: it is not waiting for a cohort yet.
    (third,) = training_for(fed, phones[2:])
    fed.service.tick()
    assert _lines(caplog) == ["class phone: 2 waiting, needs 3"]

    # Its report fills the cohort; it is sealed, and nobody waits any more.
    sealed = fed.service.get_task(phones[2], trained_task_id=third.task_id)
    assert isinstance(sealed, TaskOffer) and not sealed.is_training
    fed.service.tick()
    fed.service.tick()

    assert _lines(caplog) == [
        "class phone: 2 waiting, needs 3",
        "class phone: 0 waiting, needs 3",
    ]
